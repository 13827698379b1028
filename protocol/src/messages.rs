//! Every message that crosses the CLI–agent connection. Both directions have their own enum so a
//! peer can never be handed a message meant for the other side.

use std::net::{IpAddr, SocketAddr};

use bincode::{Decode, Encode};

/// Identifies one multiplexed stream on a connection. The CLI opens odd ids, the agent even ids
/// (see [`crate::mux::Side`]), so both ends can open streams without agreeing first.
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

/// CLI → agent.
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Must be the first message; nothing else is handled before the agent accepts it.
    Hello(Hello),
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Request {
        id: u64,
        request: Request,
    },
    Stream(StreamFrame),
}

impl crate::bulk::Bulk for ClientMessage {
    fn bulk_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            ClientMessage::Request {
                request: Request::Fs(request),
                ..
            } => request.bulk_mut(),
            ClientMessage::Stream(StreamFrame::Data { bytes, .. }) => Some(bytes),
            _ => None,
        }
    }
}

impl crate::bulk::Bulk for AgentMessage {
    fn bulk_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            AgentMessage::Response {
                response: Ok(Response::Fs(response)),
                ..
            } => response.bulk_mut(),
            AgentMessage::Stream(StreamFrame::Data { bytes, .. }) => Some(bytes),
            _ => None,
        }
    }
}

/// Agent → CLI.
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum AgentMessage {
    /// The handshake succeeded; the session is open.
    Welcome,
    /// The handshake failed; the agent closes the connection after sending this.
    Rejected(RejectReason),
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Response {
        id: u64,
        response: Result<Response, RemoteError>,
    },
    Stream(StreamFrame),
}

/// The session token. Versions were compared before, in the [`crate::greeting`].
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct Hello {
    pub token: Vec<u8>,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    BadToken,
    /// The first message was not a `Hello`.
    HelloExpected,
}

/// One request, answered by exactly one `Response` with the same id.
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum Request {
    /// The target's environment and hostname.
    TargetInfo,
    /// A file-system operation of the FUSE mount (see [`crate::fs`]).
    Fs(crate::fs::FsRequest),
    /// One DNS query message (RFC 1035 wire format), resolved in the target's network with the
    /// target's resolver configuration.
    Dns(Vec<u8>),
    /// Take over a port's incoming traffic (see [`crate::incoming`]); answered by
    /// [`Response::Subscribed`], or an error saying why the redirect cannot be installed or
    /// another session's steal conflicts. Subscribing a port again replaces its subscription.
    Subscribe(crate::incoming::Subscription),
    /// Give a port back: new connections reach the original app again. Connections already
    /// handed over go on until they end. Answered by [`Response::Unsubscribed`].
    Unsubscribe { port: u16 },
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum Response {
    TargetInfo(TargetInfo),
    Fs(crate::fs::FsResponse),
    /// The DNS response message to a [`Request::Dns`], in wire format; failures are DNS
    /// response codes inside it (NXDOMAIN, SERVFAIL…), not a [`RemoteError`].
    Dns(Vec<u8>),
    Subscribed,
    Unsubscribed,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct TargetInfo {
    /// The target process's environment, in its order. Variables that are not UTF-8 are left out.
    pub env: Vec<(String, String)>,
    /// The hostname in the target's UTS namespace.
    pub hostname: String,
    /// The target's pid as the agent sees it; `None` when the agent serves its own namespaces.
    pub pid: Option<u32>,
    /// The addresses of the target's network interfaces, loopback excluded, with their prefix
    /// lengths: the launched process takes the first IPv4 (and IPv6) one as its own, and their
    /// subnets are reached through the agent.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A failure on the remote side, errno-style so it maps onto what a local syscall would return.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// A Linux errno value (`ENOENT`, `ECONNREFUSED`…); `EIO` when nothing better fits.
    pub errno: i32,
    /// One line for humans.
    pub message: String,
}

/// What a new stream connects to on the agent's side.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum StreamTarget {
    /// A TCP connection made from the target's network namespace.
    Tcp(SocketAddr),
    /// A UDP socket connected to the address from the target's network namespace; every
    /// `Data` frame carries exactly one datagram.
    Udp(SocketAddr),
    /// Opened by the agent only: an incoming connection of a subscribed port, handed to the
    /// session (see [`crate::incoming`]).
    Incoming(crate::incoming::IncomingConnection),
}

/// Stream multiplexing and flow control. Data is only sent against credit granted by the
/// receiver (see [`crate::mux`]).
#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub enum StreamFrame {
    /// Opens stream `id` to `target`; the opener may not send data before `Opened`.
    Open {
        id: StreamId,
        target: StreamTarget,
    },
    /// The stream is connected; both sides start with [`crate::mux::INITIAL_WINDOW`] credit,
    /// which each receiver then adapts (see [`crate::mux`]).
    Opened {
        id: StreamId,
    },
    /// The stream could not be opened; the id is free again.
    OpenFailed {
        id: StreamId,
        error: RemoteError,
    },
    Data {
        id: StreamId,
        bytes: Vec<u8>,
    },
    /// The receiver consumed `bytes` more bytes; the sender may send that much more.
    Credit {
        id: StreamId,
        bytes: u32,
    },
    /// The sender will send no more data (half-close, like `shutdown(SHUT_WR)`).
    Shutdown {
        id: StreamId,
    },
    /// The stream is aborted in both directions (like a TCP RST).
    Reset {
        id: StreamId,
    },
}
