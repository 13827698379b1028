//! The CLI's session with an agent: connect, handshake, requests, keepalive. It turns every
//! failure into one line a user can act on and never hangs longer than its timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mirrord_link::endpoint::{Endpoint, ReadHalf, WriteHalf};
use mirrord_link::frames::{FrameReader, LinkError, write_loop};
use mirrord_link::greet::{GreetError, greet};
use mirrord_link::inbox::Inbox;
use mirrord_link::streams::{Datagrams, OpenError, StreamRx, Streams};
use mirrord_protocol::bulk::MAX_FILE_READ;
use mirrord_protocol::fs::{FsRequest, FsResponse};
use mirrord_protocol::greeting::{Greeting, PROTOCOL_VERSION};
use mirrord_protocol::handshake::{check_welcome, client_hello};
use mirrord_protocol::incoming::IncomingConnection;
use mirrord_protocol::mux::Side;
use mirrord_protocol::{
    AgentMessage, ClientMessage, ProtocolError, RejectReason, RemoteError, Request, Response,
    StreamFrame, StreamId, StreamTarget, TargetInfo,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;

/// Connecting and the handshake together must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
        "the agent at {addr} speaks protocol {agent} ({software}), this mirrord speaks {PROTOCOL_VERSION}; use an agent of the same release as this mirrord"
    )]
    OtherVersion {
        addr: String,
        agent: u32,
        software: String,
    },
    #[error(
        "the agent at {addr} did not greet as mirrord does: it is not a mirrord agent, or one older than protocol {PROTOCOL_VERSION}; use an agent of the same release as this mirrord"
    )]
    NotAnAgent { addr: String },
    #[error("the agent at {addr} broke the protocol: {source}")]
    Protocol { addr: String, source: ProtocolError },
    #[error("the connection to the agent was lost")]
    Lost,
    #[error("the agent answered with something else than asked")]
    UnexpectedResponse,
    #[error("the agent failed: {}", .0.message)]
    Remote(RemoteError),
}

impl ClientError {
    /// Whether the same connection attempt may succeed later: the far end did not answer, or
    /// the connection broke before the session opened (not a refusal or another version).
    pub fn may_pass(&self) -> bool {
        matches!(
            self,
            ClientError::NoAnswer { .. } | ClientError::NotAnAgent { .. } | ClientError::Lost
        )
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Response, RemoteError>>>>>;

/// A connection of a subscribed port that the agent handed over: accepted on the link, to be
/// answered with [`AgentClient::accept_incoming`] or [`AgentClient::refuse_incoming`].
pub struct IncomingStream {
    pub rx: StreamRx,
    pub connection: IncomingConnection,
}

pub struct AgentClient {
    /// client --messages--> agent.
    out_tx: mpsc::Sender<ClientMessage>,
    pending: Pending,
    next_id: AtomicU64,
    streams: Arc<Streams<ClientMessage>>,
    /// Why the session ended, once it has.
    ended_rx: watch::Receiver<Option<String>>,
    /// reader --incoming connections--> whoever delivers them (taken once).
    incoming_rx: Mutex<Option<mpsc::UnboundedReceiver<IncomingStream>>>,
}

impl AgentClient {
    /// Connects to `endpoint` and completes the greeting and handshake, within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(endpoint: &Endpoint, token: &[u8]) -> Result<AgentClient, ClientError> {
        let addr = endpoint.to_string();
        let halves = match timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(halves)) => halves,
            Ok(Err(source)) => return Err(ClientError::Unreachable { addr, source }),
            Err(_) => return Err(ClientError::NoAnswer { addr }),
        };
        AgentClient::start(halves, &addr, token).await
    }

    /// Starts a session over a connection already made (`addr` names it in errors): the
    /// greeting, then the handshake, within [`CONNECT_TIMEOUT`].
    pub async fn start(
        (mut read_half, mut write_half): (ReadHalf, WriteHalf),
        addr: &str,
        token: &[u8],
    ) -> Result<AgentClient, ClientError> {
        let no_answer = || ClientError::NoAnswer {
            addr: addr.to_owned(),
        };
        let ours = Greeting::ours(concat!("mirrord ", env!("CARGO_PKG_VERSION")));
        let agent = match timeout(
            CONNECT_TIMEOUT,
            greet(&mut read_half, &mut write_half, &ours),
        )
        .await
        {
            Ok(Ok(agent)) => agent,
            Ok(Err(GreetError::NotMirrord(_) | GreetError::Closed)) => {
                return Err(ClientError::NotAnAgent {
                    addr: addr.to_owned(),
                });
            }
            Ok(Err(GreetError::Io(_))) => return Err(ClientError::Lost),
            Err(_) => return Err(no_answer()),
        };
        if !agent.compatible() {
            return Err(ClientError::OtherVersion {
                addr: addr.to_owned(),
                agent: agent.version,
                software: agent.software,
            });
        }
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
            source => ClientError::Protocol {
                addr: addr.to_owned(),
                source,
            },
        })?;

        let pending = Pending::default();
        let streams = Streams::new(Side::Client, out_tx.clone());
        let (ended_tx, ended_rx) = watch::channel(None);
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let session = Session {
            pending: pending.clone(),
            streams: streams.clone(),
            ended_tx,
            incoming_tx,
        };
        tokio::spawn(read_loop(
            Inbox::new(reader),
            out_tx.clone(),
            session,
            addr.to_owned(),
        ));
        Ok(AgentClient {
            out_tx,
            pending,
            next_id: AtomicU64::new(1),
            streams,
            ended_rx,
            incoming_rx: Mutex::new(Some(incoming_rx)),
        })
    }

    pub async fn request(&self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer_rx) = oneshot::channel();
        lock(&self.pending).insert(id, answer_tx);
        // The reader marks the session ended before it drops the pending answers: a request
        // made after that is refused here, one made before is dropped by the reader. Either
        // way none waits for an answer from an agent that is gone (its link may still take
        // writes: a port-forward outlives the pod behind it).
        if self.ended_rx.borrow().is_some() {
            lock(&self.pending).remove(&id);
            return Err(ClientError::Lost);
        }
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

    /// The first [`MAX_FILE_READ`] bytes of one of the target's files (configuration files:
    /// resolv.conf, hosts).
    pub async fn read_small_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let read = FsRequest::Read {
            path: path.to_owned(),
            offset: 0,
            len: MAX_FILE_READ,
        };
        match self.request(Request::Fs(read)).await? {
            Response::Fs(FsResponse::Data(data)) => Ok(data),
            _ => Err(ClientError::UnexpectedResponse),
        }
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

    /// The connections the agent hands over for subscribed ports; `None` after the first call.
    /// Nothing else reads them, so whoever subscribes must take them first.
    pub fn take_incoming(&self) -> Option<mpsc::UnboundedReceiver<IncomingStream>> {
        lock(&self.incoming_rx).take()
    }

    /// Answers a handed-over connection as opened and pipes it to `io` (the local app) until
    /// both directions are done.
    pub async fn accept_incoming<S: AsyncRead + AsyncWrite>(&self, rx: StreamRx, io: S) {
        let id = rx.id();
        if self.streams.send(StreamFrame::Opened { id }).await {
            self.streams.clone().pipe(io, rx).await;
        } else {
            self.streams.discard(id);
        }
    }

    /// Answers a handed-over connection as failed: the agent resets the client's connection.
    pub async fn refuse_incoming(&self, rx: StreamRx, error: RemoteError) {
        refuse_stream(&self.streams, rx.id(), error).await;
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

async fn refuse_stream(streams: &Streams<ClientMessage>, id: StreamId, error: RemoteError) {
    streams.send(StreamFrame::OpenFailed { id, error }).await;
    streams.discard(id);
}

/// What the reader shares with the client.
struct Session {
    pending: Pending,
    streams: Arc<Streams<ClientMessage>>,
    /// reader --why the session ended--> client.
    ended_tx: watch::Sender<Option<String>>,
    /// reader --incoming connections--> client.
    incoming_tx: mpsc::UnboundedSender<IncomingStream>,
}

/// A stream the agent opened: an incoming connection goes to whoever took them; anything else
/// is refused (only the CLI opens outgoing streams), and so is any beyond the most streams a
/// connection may have. An id the agent may not open is a protocol error that ends the session.
fn on_agent_open(
    session: &Session,
    id: StreamId,
    target: StreamTarget,
) -> Result<(), ProtocolError> {
    let rx = match session.streams.accept(id, &target) {
        Ok(rx) => rx,
        Err(ProtocolError::TooManyStreams { max }) => {
            let error = RemoteError {
                errno: libc::EMFILE,
                message: format!("this session has {max} streams open, the most it takes"),
            };
            // The reader must not wait on the writer, and a task per refusal would let an agent
            // that opens without end and never reads make the CLI hold without end: a refusal
            // that finds the writer's queue full is dropped.
            if !session
                .streams
                .try_send(StreamFrame::OpenFailed { id, error })
            {
                tracing::debug!(?id, "refusal of a stream dropped: the agent is not reading");
            }
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    let error = match target {
        StreamTarget::Incoming(connection) => {
            match session.incoming_tx.send(IncomingStream { rx, connection }) {
                Ok(()) => return Ok(()),
                Err(unsent) => (
                    unsent.0.rx,
                    RemoteError {
                        errno: libc::ECONNREFUSED,
                        message: "this session takes no incoming traffic".into(),
                    },
                ),
            }
        }
        StreamTarget::Tcp(_) | StreamTarget::Udp(_) => (
            rx,
            RemoteError {
                errno: libc::EINVAL,
                message: "only the CLI opens outgoing streams".into(),
            },
        ),
    };
    let (rx, error) = error;
    let streams = session.streams.clone();
    // The reader must not wait on the writer's queue.
    tokio::spawn(async move { refuse_stream(&streams, rx.id(), error).await });
    Ok(())
}

/// Dispatches the agent's messages until the connection ends; then every pending request
/// fails with `Lost` (its sender is dropped) and every stream is reset. `addr` names the
/// connection: its end may come from the agent or from what carries it (a port-forward ends
/// with the API server or the kubelet), which this side cannot tell apart.
async fn read_loop(
    mut inbox: Inbox<ReadHalf>,
    out_tx: mpsc::Sender<ClientMessage>,
    session: Session,
    addr: String,
) {
    let ended = loop {
        let message = match inbox.next::<AgentMessage, _>(&out_tx).await {
            Ok(message) => message,
            Err(LinkError::Closed) => break format!("the connection to the agent at {addr} ended"),
            Err(LinkError::PeerDead) => break "the agent stopped answering pings".to_owned(),
            Err(LinkError::Io(error)) => {
                break format!("the connection to the agent broke: {error}");
            }
            Err(error) => break error.to_string(),
        };
        match message {
            AgentMessage::Response { id, response } => {
                if let Some(answer_tx) = lock(&session.pending).remove(&id) {
                    let _ = answer_tx.send(response);
                }
            }
            // The inbox answers these itself.
            AgentMessage::Ping { .. } | AgentMessage::Pong { .. } => {}
            AgentMessage::Stream(StreamFrame::Open { id, target }) => {
                if let Err(error) = on_agent_open(&session, id, target) {
                    break error.to_string();
                }
            }
            AgentMessage::Stream(frame) => {
                if let Err(error) = session.streams.on_frame(frame) {
                    break error.to_string();
                }
            }
            AgentMessage::Welcome | AgentMessage::Rejected(_) => {
                break "the agent sent a message out of place".to_owned();
            }
        }
    };
    tracing::debug!("agent session ended: {ended}");
    session.ended_tx.send_replace(Some(ended));
    lock(&session.pending).clear();
    session.streams.reset_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A fake agent on an abstract socket that sends `first` and keeps the connection open.
    async fn agent_saying(first: Vec<u8>) -> Endpoint {
        let name = format!(
            "unix:@mirrord-client-test-{}",
            getrandom::u64().unwrap_or(0)
        );
        let endpoint: Endpoint = name.parse().unwrap();
        let listener = endpoint.bind().unwrap().into_async().unwrap();
        tokio::spawn(async move {
            let (mut read, mut write, _) = listener.accept().await.unwrap();
            write.write_all(&first).await.unwrap();
            let mut sink = Vec::new();
            let _ = read.read_to_end(&mut sink).await;
        });
        endpoint
    }

    #[tokio::test]
    async fn an_agent_of_another_release_is_named_in_one_line() {
        let newer = Greeting {
            version: PROTOCOL_VERSION + 1,
            software: "mirrord-agent 9.0.0".into(),
        };
        let endpoint = agent_saying(newer.encode()).await;
        let error = AgentClient::connect(&endpoint, b"token")
            .await
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            format!(
                "the agent at {endpoint} speaks protocol {} (mirrord-agent 9.0.0), this mirrord \
                 speaks {PROTOCOL_VERSION}; use an agent of the same release as this mirrord",
                PROTOCOL_VERSION + 1
            )
        );
    }

    #[tokio::test]
    async fn a_peer_that_does_not_greet_is_not_an_agent() {
        // An agent of protocol 3 sent no greeting: its first bytes were a frame header.
        let endpoint = agent_saying(vec![0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0]).await;
        let error = AgentClient::connect(&endpoint, b"token")
            .await
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("did not greet as mirrord does"),
            "{error}"
        );
    }

    /// A fake agent that completes the handshake; returns what the client sends and a sender
    /// for what the agent says.
    async fn greeting_agent() -> (
        AgentClient,
        FrameReader<ReadHalf>,
        mpsc::Sender<AgentMessage>,
    ) {
        let name = format!(
            "unix:@mirrord-client-test-{}",
            getrandom::u64().unwrap_or(0)
        );
        let endpoint: Endpoint = name.parse().unwrap();
        let listener = endpoint.bind().unwrap().into_async().unwrap();
        let agent = tokio::spawn(async move {
            let (mut read, mut write, _) = listener.accept().await.unwrap();
            let ours = Greeting::ours("mirrord-agent test");
            greet(&mut read, &mut write, &ours).await.unwrap();
            let mut reader = FrameReader::new(read);
            let _hello: ClientMessage = reader.next().await.unwrap();
            let (out_tx, out_rx) = mpsc::channel(16);
            tokio::spawn(write_loop(write, out_rx));
            out_tx.send(AgentMessage::Welcome).await.unwrap();
            (reader, out_tx)
        });
        let client = AgentClient::connect(&endpoint, b"token").await.unwrap();
        let (reader, out_tx) = agent.await.unwrap();
        (client, reader, out_tx)
    }

    /// The next stream frame the client sends.
    async fn next_frame(reader: &mut FrameReader<ReadHalf>) -> StreamFrame {
        loop {
            match reader.next::<ClientMessage>().await.unwrap() {
                ClientMessage::Stream(frame) => return frame,
                _ => continue,
            }
        }
    }

    fn incoming(port: u16) -> StreamTarget {
        StreamTarget::Incoming(IncomingConnection {
            port,
            peer: ([10, 0, 0, 7], 51234).into(),
            destination: ([10, 0, 0, 2], port).into(),
            mode: mirrord_protocol::incoming::IncomingMode::Steal,
        })
    }

    #[tokio::test]
    async fn agent_opened_streams_are_handed_over_or_refused_without_ending_the_session() {
        let (client, mut reader, agent_tx) = greeting_agent().await;
        let open = |id, target| {
            AgentMessage::Stream(StreamFrame::Open {
                id: StreamId(id),
                target,
            })
        };
        // Only the CLI opens outgoing streams: refused, and the session goes on.
        let tcp = StreamTarget::Tcp(([10, 0, 0, 9], 80).into());
        agent_tx.send(open(2, tcp)).await.unwrap();
        match next_frame(&mut reader).await {
            StreamFrame::OpenFailed { id, error } => {
                assert_eq!((id, error.errno), (StreamId(2), libc::EINVAL))
            }
            other => panic!("unexpected {other:?}"),
        }
        // An incoming connection reaches whoever took them; refused, the agent hears why.
        let mut streams = client.take_incoming().unwrap();
        assert!(client.take_incoming().is_none(), "taken once");
        agent_tx.send(open(4, incoming(8080))).await.unwrap();
        let stream = streams.recv().await.unwrap();
        assert_eq!(stream.connection.port, 8080);
        let refusal = RemoteError {
            errno: libc::ECONNREFUSED,
            message: "nothing listens".into(),
        };
        client.refuse_incoming(stream.rx, refusal.clone()).await;
        assert_eq!(
            next_frame(&mut reader).await,
            StreamFrame::OpenFailed {
                id: StreamId(4),
                error: refusal
            }
        );
        // Accepted, it is answered as opened and its bytes reach the local side.
        agent_tx.send(open(6, incoming(8080))).await.unwrap();
        let stream = streams.recv().await.unwrap();
        let (app, mut app_side) = tokio::io::duplex(1024);
        tokio::spawn(async move { client.accept_incoming(stream.rx, app).await });
        assert_eq!(
            next_frame(&mut reader).await,
            StreamFrame::Opened { id: StreamId(6) }
        );
        agent_tx
            .send(AgentMessage::Stream(StreamFrame::Data {
                id: StreamId(6),
                bytes: b"GET / HTTP/1.1\r\n".to_vec(),
            }))
            .await
            .unwrap();
        let mut got = [0u8; 16];
        app_side.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    }

    /// A fake agent that completes the handshake and then writes whatever the test wants:
    /// the client, what it sends, and the raw writing half.
    async fn raw_agent() -> (AgentClient, FrameReader<ReadHalf>, WriteHalf) {
        let name = format!(
            "unix:@mirrord-client-test-{}",
            getrandom::u64().unwrap_or(0)
        );
        let endpoint: Endpoint = name.parse().unwrap();
        let listener = endpoint.bind().unwrap().into_async().unwrap();
        let agent = tokio::spawn(async move {
            let (mut read, mut write, _) = listener.accept().await.unwrap();
            greet(&mut read, &mut write, &Greeting::ours("mirrord-agent test"))
                .await
                .unwrap();
            let mut reader = FrameReader::new(read);
            let _hello: ClientMessage = reader.next().await.unwrap();
            write
                .write_all(&frame_of(&AgentMessage::Welcome))
                .await
                .unwrap();
            (reader, write)
        });
        let client = AgentClient::connect(&endpoint, b"token").await.unwrap();
        let (reader, write) = agent.await.unwrap();
        (client, reader, write)
    }

    fn frame_of(message: &AgentMessage) -> Vec<u8> {
        let mut bytes = Vec::new();
        mirrord_protocol::frame::encode(message, &mut bytes).unwrap();
        bytes
    }

    /// The reason the session ended, which must come soon.
    async fn ends(client: &AgentClient) -> String {
        tokio::time::timeout(Duration::from_secs(10), client.lost())
            .await
            .expect("the session ends")
    }

    #[tokio::test]
    async fn an_agent_claiming_a_huge_frame_ends_the_session_at_its_header() {
        let (client, _reader, mut agent) = raw_agent().await;
        // Four gigabytes announced, none sent: refused from the header, nothing waited for.
        agent
            .write_all(&[u32::MAX.to_be_bytes(), 0u32.to_be_bytes()].concat())
            .await
            .unwrap();
        let reason = ends(&client).await;
        assert!(reason.contains("exceeds the"), "{reason}");
        assert!(matches!(client.target_info().await, Err(ClientError::Lost)));
    }

    #[tokio::test]
    async fn an_agent_sending_past_a_stalled_streams_window_ends_the_session() {
        use mirrord_protocol::mux::INITIAL_WINDOW;
        let (client, mut reader, mut agent) = raw_agent().await;
        let mut streams = client.take_incoming().unwrap();
        let open = AgentMessage::Stream(StreamFrame::Open {
            id: StreamId(2),
            target: incoming(8080),
        });
        agent.write_all(&frame_of(&open)).await.unwrap();
        let stream = streams.recv().await.unwrap();
        // The local app never reads: nothing drains, no credit goes back.
        let (app, _app_never_reads) = tokio::io::duplex(1024);
        let client = Arc::new(client);
        let accepting = client.clone();
        tokio::spawn(async move { accepting.accept_incoming(stream.rx, app).await });
        assert_eq!(
            next_frame(&mut reader).await,
            StreamFrame::Opened { id: StreamId(2) }
        );
        let chunk = AgentMessage::Stream(StreamFrame::Data {
            id: StreamId(2),
            bytes: vec![7; INITIAL_WINDOW as usize / 2],
        });
        // A new stream's window is taken and held; the chunk after it breaks the protocol.
        for _ in 0..2 {
            agent.write_all(&frame_of(&chunk)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            client.ended_rx.borrow().is_none(),
            "a full window is within the rules"
        );
        agent.write_all(&frame_of(&chunk)).await.unwrap();
        let reason = ends(&client).await;
        assert!(reason.contains("bytes of credit"), "{reason}");
    }

    #[tokio::test]
    async fn an_agent_flooding_stream_opens_is_refused_beyond_the_limit() {
        use mirrord_protocol::mux::MAX_STREAMS;
        let (client, mut reader, mut agent) = raw_agent().await;
        // Taken and held, never answered: every one stays open.
        let mut streams = client.take_incoming().unwrap();
        let extra = 10;
        let mut bytes = Vec::new();
        for n in 0..MAX_STREAMS + extra {
            let open = AgentMessage::Stream(StreamFrame::Open {
                id: StreamId(2 * (n as u32 + 1)),
                target: incoming(8080),
            });
            bytes.extend_from_slice(&frame_of(&open));
        }
        agent.write_all(&bytes).await.unwrap();
        let mut refused = 0;
        while refused < extra {
            match next_frame(&mut reader).await {
                StreamFrame::OpenFailed { error, .. } => {
                    assert_eq!(error.errno, libc::EMFILE);
                    refused += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let mut held = 0;
        while streams.try_recv().is_ok() {
            held += 1;
        }
        assert_eq!(held, MAX_STREAMS);
        assert!(client.ended_rx.borrow().is_none(), "the session goes on");
    }
}
