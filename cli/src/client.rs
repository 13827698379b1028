//! The CLI's session with an agent: connect, handshake, requests, keepalive. It turns every
//! failure into one line a user can act on and never hangs longer than its timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mirrord_agent::endpoint::{Endpoint, ReadHalf};
use mirrord_agent::link::{
    Datagrams, FrameReader, LinkError, OpenError, StreamRx, Streams, write_loop,
};
use mirrord_protocol::handshake::{check_welcome, client_hello};
use mirrord_protocol::keepalive::{Keepalive, KeepaliveAction};
use mirrord_protocol::mux::Side;
use mirrord_protocol::{
    AgentMessage, ClientMessage, ProtocolError, RejectReason, RemoteError, Request, Response,
    StreamTarget, TargetInfo,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, timeout};

/// Connecting and the handshake together must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PEER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "the agent at {addr} did not answer within {CONNECT_TIMEOUT:?}; is it a mirrord agent?"
    )]
    NoAnswer { addr: String },
    #[error(
        "the agent at {addr} rejected the session token; pass the token it was started with (--agent-token or MIRRORD_AGENT_TOKEN)"
    )]
    BadToken { addr: String },
    #[error(
        "the agent at {addr} speaks protocol version {agent}, this mirrord speaks {client}; use an agent and CLI of the same release"
    )]
    VersionMismatch {
        addr: String,
        agent: u32,
        client: u32,
    },
    #[error("the agent at {addr} broke the protocol: {source}")]
    Protocol { addr: String, source: ProtocolError },
    #[error("the connection to the agent was lost")]
    Lost,
    #[error("the agent answered with something else than asked")]
    UnexpectedResponse,
    #[error("the agent failed: {}", .0.message)]
    Remote(RemoteError),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Response, RemoteError>>>>>;

pub struct AgentClient {
    /// client --messages--> agent.
    out_tx: mpsc::Sender<ClientMessage>,
    pending: Pending,
    next_id: AtomicU64,
    streams: Arc<Streams<ClientMessage>>,
    /// Why the session ended, once it has.
    ended_rx: watch::Receiver<Option<String>>,
}

impl AgentClient {
    /// Connects to `endpoint` and completes the handshake, within [`CONNECT_TIMEOUT`].
    pub async fn connect(endpoint: &Endpoint, token: &[u8]) -> Result<AgentClient, ClientError> {
        let addr = &endpoint.to_string();
        let no_answer = || ClientError::NoAnswer {
            addr: addr.to_owned(),
        };
        let (read_half, write_half) = match timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(halves)) => halves,
            Ok(Err(source)) => {
                return Err(ClientError::Unreachable {
                    addr: addr.to_owned(),
                    source,
                });
            }
            Err(_) => return Err(no_answer()),
        };
        let mut reader = FrameReader::new(read_half);
        let (out_tx, out_rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            if let Err(error) = write_loop(write_half, out_rx).await {
                tracing::debug!("agent writer ended: {error}");
            }
        });
        out_tx
            .send(client_hello(token))
            .await
            .map_err(|_| ClientError::Lost)?;
        let reply = match timeout(CONNECT_TIMEOUT, reader.next::<AgentMessage>()).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(LinkError::Protocol(source))) => {
                return Err(ClientError::Protocol {
                    addr: addr.to_owned(),
                    source,
                });
            }
            Ok(Err(_)) => return Err(ClientError::Lost),
            Err(_) => return Err(no_answer()),
        };
        check_welcome(reply).map_err(|error| match error {
            ProtocolError::Rejected(RejectReason::BadToken) => ClientError::BadToken {
                addr: addr.to_owned(),
            },
            ProtocolError::Rejected(RejectReason::VersionMismatch { agent, client }) => {
                ClientError::VersionMismatch {
                    addr: addr.to_owned(),
                    agent,
                    client,
                }
            }
            source => ClientError::Protocol {
                addr: addr.to_owned(),
                source,
            },
        })?;

        let pending = Pending::default();
        let streams = Streams::new(Side::Client, out_tx.clone());
        let (ended_tx, ended_rx) = watch::channel(None);
        let session = Session {
            pending: pending.clone(),
            streams: streams.clone(),
            ended_tx,
        };
        tokio::spawn(read_loop(reader, out_tx.clone(), session));
        Ok(AgentClient {
            out_tx,
            pending,
            next_id: AtomicU64::new(1),
            streams,
            ended_rx,
        })
    }

    pub async fn request(&self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer_rx) = oneshot::channel();
        lock(&self.pending).insert(id, answer_tx);
        if self
            .out_tx
            .send(ClientMessage::Request { id, request })
            .await
            .is_err()
        {
            lock(&self.pending).remove(&id);
            return Err(ClientError::Lost);
        }
        answer_rx
            .await
            .map_err(|_| ClientError::Lost)?
            .map_err(ClientError::Remote)
    }

    pub async fn target_info(&self) -> Result<TargetInfo, ClientError> {
        match self.request(Request::TargetInfo).await? {
            Response::TargetInfo(info) => Ok(info),
            _ => Err(ClientError::UnexpectedResponse),
        }
    }
}

impl AgentClient {
    /// Resolves when the session with the agent has ended (the agent died, closed the
    /// connection or stopped answering pings), with the reason.
    pub async fn lost(&self) -> String {
        let mut ended_rx = self.ended_rx.clone();
        match ended_rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the session ended".to_owned(),
        }
    }

    /// Opens a TCP connection from the target's network namespace to `addr`.
    pub async fn connect_tcp(&self, addr: SocketAddr) -> Result<StreamRx, ClientError> {
        self.open(StreamTarget::Tcp(addr)).await
    }

    /// Opens a UDP socket connected to `addr` in the target's network namespace.
    pub async fn connect_udp(&self, addr: SocketAddr) -> Result<StreamRx, ClientError> {
        self.open(StreamTarget::Udp(addr)).await
    }

    async fn open(&self, target: StreamTarget) -> Result<StreamRx, ClientError> {
        self.streams
            .open(target)
            .await
            .map_err(|error| match error {
                OpenError::Remote(error) => ClientError::Remote(error),
                OpenError::Lost => ClientError::Lost,
            })
    }

    /// Resets an opened stream nothing will use (the app went away meanwhile).
    pub async fn abandon(&self, stream: StreamRx) {
        self.streams.abandon(stream).await;
    }

    /// Pipes bytes between `io` and an opened TCP stream until both directions are done.
    pub async fn pipe<S: AsyncRead + AsyncWrite>(&self, io: S, stream: StreamRx) {
        self.streams.clone().pipe(io, stream).await;
    }

    /// Carries datagrams between `socket` and an opened UDP stream until either side ends.
    pub async fn pipe_datagrams<D: Datagrams>(&self, socket: D, stream: StreamRx) {
        self.streams.clone().pipe_datagrams(socket, stream).await;
    }
}

/// A poison-tolerant lock, for state that stays consistent across a panic elsewhere (every
/// update is one operation), where poisoning carries no information.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the reader shares with the client.
struct Session {
    pending: Pending,
    streams: Arc<Streams<ClientMessage>>,
    /// reader --why the session ended--> client.
    ended_tx: watch::Sender<Option<String>>,
}

/// Dispatches the agent's messages until the connection ends; then every pending request
/// fails with `Lost` (its sender is dropped) and every stream is reset.
async fn read_loop(
    mut reader: FrameReader<ReadHalf>,
    out_tx: mpsc::Sender<ClientMessage>,
    session: Session,
) {
    let Session {
        pending,
        streams,
        ended_tx,
    } = session;
    let mut keepalive = Keepalive::new(PING_INTERVAL, PEER_TIMEOUT, std::time::Instant::now());
    let ended = loop {
        let deadline = tokio::time::Instant::from_std(keepalive.next_deadline());
        let message = tokio::select! {
            message = reader.next::<AgentMessage>() => message,
            () = sleep_until(deadline) => {
                match keepalive.poll(std::time::Instant::now()) {
                    KeepaliveAction::Idle => {}
                    KeepaliveAction::SendPing { nonce } => {
                        let _ = out_tx.send(ClientMessage::Ping { nonce }).await;
                    }
                    KeepaliveAction::PeerDead => break "the agent stopped answering pings".to_owned(),
                }
                continue;
            }
        };
        let message = match message {
            Ok(message) => message,
            Err(LinkError::Closed) => break "the agent closed the connection".to_owned(),
            Err(error) => break error.to_string(),
        };
        keepalive.on_receive(std::time::Instant::now());
        match message {
            AgentMessage::Response { id, response } => {
                if let Some(answer_tx) = lock(&pending).remove(&id) {
                    let _ = answer_tx.send(response);
                }
            }
            AgentMessage::Ping { nonce } => {
                let _ = out_tx.send(ClientMessage::Pong { nonce }).await;
            }
            AgentMessage::Pong { nonce } => keepalive.on_pong(nonce, std::time::Instant::now()),
            AgentMessage::Stream(frame) => {
                if let Err(error) = streams.on_frame(frame) {
                    break error.to_string();
                }
            }
            AgentMessage::Welcome(_) | AgentMessage::Rejected(_) => {
                break "the agent sent a message out of place".to_owned();
            }
        }
    };
    tracing::debug!("agent session ended: {ended}");
    lock(&pending).clear();
    streams.reset_all();
    ended_tx.send_replace(Some(ended));
}
