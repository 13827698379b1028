//! Accepts CLI sessions and serves them: the handshake, requests about the target, TCP
//! streams opened from the target's network namespace, and subscriptions to the target's
//! incoming traffic (handed to [`crate::incoming`]). It never handles a message of a session
//! that has not passed the handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mirrord_dns::DnsResolver;
use mirrord_link::endpoint::{Listener, ReadHalf, WriteHalf};
use mirrord_link::frames::{BulkOut, FrameReader, LinkError, Outbound, write_loop};
use mirrord_link::greet::{GreetError, greet};
use mirrord_link::inbox::Inbox;
use mirrord_link::piped::PipedBytes;
use mirrord_link::streams::{Outgoing, Streams};
use mirrord_protocol::bulk::MAX_FILE_READ;
use mirrord_protocol::frame;
use mirrord_protocol::fs::FsResponse;
use mirrord_protocol::greeting::{Greeting, PROTOCOL_VERSION};
use mirrord_protocol::handshake::accept_hello;
use mirrord_protocol::mux::Side;
use mirrord_protocol::{
    AgentMessage, ClientMessage, ProtocolError, RejectReason, RemoteError, Request, Response,
    StreamFrame, StreamTarget, TargetInfo,
};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::error::io_err;
use crate::files::{self, FileBytes};
use crate::fs::Answer;
use crate::incoming::{Incoming, Redirect, registry::SessionId};
use crate::target::Target;

/// A client that connects but does not greet and say hello within this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests of one session being answered at once. The session's reader waits for one to finish
/// before it reads more: a client that sends requests without end and never reads the answers
/// makes the agent hold this many answers (a file read's can be a pipe of 1 MiB), not more.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 1024;
/// How long the agent waits before accepting again after an accept failed for want of
/// descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connect to a remote address may take before the stream fails with ETIMEDOUT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Config {
    pub token: Vec<u8>,
    /// The agent exits when no session has been open for this long.
    pub idle_ttl: Duration,
    /// Exit when the first session that was let in ends (an agent that cannot be removed, such
    /// as an ephemeral container, ends with its session).
    pub once: bool,
    /// Whose nftables table redirects subscribed ports, and the guard that removes it.
    pub redirect: Redirect,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no greeting and hello within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("the client's greeting: {0}")]
    Greeting(#[from] GreetError),
    #[error(
        "the client ({software}) speaks protocol {client}, this agent speaks {PROTOCOL_VERSION}"
    )]
    OtherVersion { software: String, client: u32 },
    #[error("handshake refused: {0:?}")]
    Refused(mirrord_protocol::RejectReason),
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl SessionError {
    /// The client closed or reset the connection before its greeting was read.
    fn left_before_greeting(&self) -> bool {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match self {
            SessionError::Greeting(GreetError::Closed) => true,
            SessionError::Greeting(GreetError::Io(error)) => {
                matches!(
                    error.kind(),
                    BrokenPipe | ConnectionReset | ConnectionAborted
                )
            }
            _ => false,
        }
    }
}

impl From<ProtocolError> for SessionError {
    fn from(error: ProtocolError) -> Self {
        SessionError::Link(error.into())
    }
}

struct Agent {
    token: Vec<u8>,
    idle_ttl: Duration,
    once: bool,
    /// Whether a session was let in (past the token check).
    admitted: AtomicBool,
    target: Target,
    incoming: Arc<Incoming>,
    /// Built on the first DNS query, from the target's files as they are then.
    dns: tokio::sync::OnceCell<DnsResolver>,
}

/// Serves sessions on `listener` until no client has been connected for the idle TTL.
///
/// Every socket the sessions open is created on the calling runtime's threads, so running this
/// on a runtime that joined the target's network namespace puts all of them in the pod.
pub async fn run(listener: Listener, config: Config, target: Target) -> std::io::Result<()> {
    let agent = Arc::new(Agent {
        token: config.token,
        idle_ttl: config.idle_ttl,
        once: config.once,
        admitted: AtomicBool::new(false),
        target,
        incoming: Incoming::new(config.redirect),
        dns: tokio::sync::OnceCell::new(),
    });
    // Tables of agents killed with their guard would redirect the target's ports to nobody.
    let incoming = agent.incoming.clone();
    tokio::spawn(async move { incoming.sweep_stale().await });
    let active = Arc::new(AtomicUsize::new(0));
    let session_ended = Arc::new(Notify::new());
    let mut idle_since = Some(Instant::now());
    loop {
        let idle_deadline = idle_since.map(|since| since + agent.idle_ttl);
        tokio::select! {
            accepted = listener.accept() => {
                let (read_half, write_half, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) if passing(&error) => {
                        // The sessions already open go on; accepting resumes once a descriptor
                        // is free again (a flood of connections holds them only until its
                        // handshakes time out).
                        warn!("cannot accept a session: {error}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                active.fetch_add(1, Ordering::SeqCst);
                idle_since = None;
                let (agent, active, session_ended) = (agent.clone(), active.clone(), session_ended.clone());
                tokio::spawn(async move {
                    match serve(read_half, write_half, &agent).await {
                        Ok(()) => info!(%peer, "session ended"),
                        // A client that leaves before greeting (a Ctrl-C while mirrord
                        // connects, a port probe) did nothing the agent must warn about; a local
                        // agent's warnings reach the user's terminal.
                        Err(error) if error.left_before_greeting() => {
                            info!(%peer, "session ended: {error}")
                        }
                        Err(error) => warn!(%peer, "session ended: {error}"),
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                    session_ended.notify_one();
                });
            }
            () = session_ended.notified() => {
                if active.load(Ordering::SeqCst) == 0 {
                    if agent.once && agent.admitted.load(Ordering::SeqCst) {
                        info!("the session ended; exiting");
                        return Ok(());
                    }
                    idle_since = Some(Instant::now());
                }
            }
            () = sleep_until(idle_deadline.unwrap_or_else(Instant::now)), if idle_deadline.is_some() => {
                info!(ttl = ?agent.idle_ttl, "no client within the idle TTL; exiting");
                return Ok(());
            }
        }
    }
}

/// Raises this process's soft limit of open descriptors to its hard limit, and returns the limit
/// in force. Each stream a session opens holds a socket: under the usual soft limit (1024) one
/// session's [`mirrord_protocol::mux::MAX_STREAMS`] would use up what the other sessions and
/// the listener need; the hard limit (commonly 2^20 in a container) leaves room for many.
/// Best effort: a limit that cannot be read or raised stays as it is.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(raised.rlim_cur);
        }
    }
    Some(limit.rlim_cur)
}

/// Whether an accept failed for want of resources or because of the one connection, rather than
/// because the listener itself broke.
fn passing(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
        )
    )
}

async fn serve(
    mut read_half: ReadHalf,
    mut write_half: WriteHalf,
    agent: &Arc<Agent>,
) -> Result<(), SessionError> {
    let ours = Greeting::ours(concat!("mirrord-agent ", env!("CARGO_PKG_VERSION")));
    let (client, hello) = timeout(HANDSHAKE_TIMEOUT, async {
        let client = greet(&mut read_half, &mut write_half, &ours).await?;
        if !client.compatible() {
            // The client read our greeting too, and tells its user; nothing more to say.
            return Ok((client, None));
        }
        let mut reader = FrameReader::new(read_half);
        let hello = reader.next::<ClientMessage>().await;
        Ok::<_, SessionError>((client, Some((reader, hello))))
    })
    .await
    .map_err(|_| SessionError::HandshakeTimeout)??;
    let Some((reader, hello)) = hello else {
        return Err(SessionError::OtherVersion {
            software: client.software,
            client: client.version,
        });
    };
    let refusal = match hello {
        Ok(hello) => accept_hello(&hello, &agent.token).err(),
        // An oversized or undecodable first frame is no Hello either, and the client hears so.
        Err(LinkError::Protocol(error)) => {
            debug!("the client's first frame: {error}");
            Some(RejectReason::HelloExpected)
        }
        Err(error) => return Err(error.into()),
    };
    let (out_tx, out_rx) = mpsc::channel::<AgentOut>(1024);
    if let Some(reason) = refusal {
        // Say why before closing, so the CLI can print it instead of "connection reset".
        let mut buf = Vec::new();
        frame::encode(&AgentMessage::Rejected(reason.clone()), &mut buf)?;
        use tokio::io::AsyncWriteExt;
        write_half.write_all(&buf).await.map_err(LinkError::from)?;
        write_half.shutdown().await.map_err(LinkError::from)?;
        return Err(SessionError::Refused(reason));
    }
    out_tx.try_send(AgentMessage::Welcome.into()).ok();
    agent.admitted.store(true, Ordering::SeqCst);
    info!("session open");
    let writer = tokio::spawn(write_loop(write_half, out_rx));
    let streams = Streams::new(Side::Agent, out_tx.clone());
    let session = agent.incoming.open_session(&streams);

    let result = session_loop(Inbox::new(reader), agent, session, &out_tx, &streams).await;
    agent.incoming.end_session(session).await;
    streams.reset_all();
    drop(out_tx);
    drop(streams);
    match writer.await {
        Ok(Err(error)) => debug!("writer ended: {error}"),
        Err(error) => warn!("writer task failed: {error}"),
        Ok(Ok(())) => {}
    }
    match result {
        Err(SessionError::Link(LinkError::Closed)) => Ok(()),
        other => other,
    }
}

async fn session_loop(
    mut inbox: Inbox<ReadHalf>,
    agent: &Arc<Agent>,
    session: SessionId,
    out_tx: &mpsc::Sender<AgentOut>,
    streams: &Arc<Streams<AgentOut>>,
) -> Result<(), SessionError> {
    let in_flight = Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
    loop {
        match inbox.next::<ClientMessage, _>(out_tx).await? {
            ClientMessage::Hello(_) => {
                return Err(ProtocolError::UnexpectedMessage("a second hello").into());
            }
            // The inbox answers these itself.
            ClientMessage::Ping { .. } | ClientMessage::Pong { .. } => {}
            ClientMessage::Request { id, request } => {
                // Never closed, so acquiring only waits.
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    continue;
                };
                let (agent, out_tx) = (agent.clone(), out_tx.clone());
                tokio::spawn(async move {
                    let _ = out_tx
                        .send(answer(&agent, session, id, request).await)
                        .await;
                    drop(permit);
                });
            }
            ClientMessage::Stream(StreamFrame::Open { id, target }) => {
                let rx = match streams.accept(id, &target) {
                    Ok(rx) => rx,
                    Err(ProtocolError::TooManyStreams { max }) => {
                        let error = RemoteError {
                            errno: libc::EMFILE,
                            message: format!(
                                "this session has {max} streams open, the most an agent serves one session"
                            ),
                        };
                        streams.send(StreamFrame::OpenFailed { id, error }).await;
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                };
                let streams = streams.clone();
                tokio::spawn(async move {
                    let opened = match target {
                        StreamTarget::Tcp(addr) => connect(addr).await.map(Opened::Tcp),
                        StreamTarget::Udp(addr) => udp(addr).await.map(Opened::Udp),
                        StreamTarget::Incoming(_) => Err(RemoteError {
                            errno: libc::EINVAL,
                            message: "only the agent opens incoming streams".into(),
                        }),
                    };
                    match opened {
                        Ok(socket) if streams.send(StreamFrame::Opened { id }).await => {
                            match socket {
                                Opened::Tcp(socket) => streams.pipe(socket, rx).await,
                                Opened::Udp(socket) => streams.pipe_datagrams(socket, rx).await,
                            }
                        }
                        Ok(_) => streams.discard(id),
                        Err(error) => {
                            streams.discard(id);
                            streams.send(StreamFrame::OpenFailed { id, error }).await;
                        }
                    }
                });
            }
            ClientMessage::Stream(frame) => streams.on_frame(frame)?,
        }
    }
}

/// A stream's socket, connected from this runtime's (the target's) network namespace.
enum Opened {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

async fn udp(addr: SocketAddr) -> Result<UdpSocket, RemoteError> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|error| io_error(&error, "bind a UDP socket"))?;
    socket
        .connect(addr)
        .await
        .map_err(|error| io_error(&error, &format!("connect UDP to {addr}")))?;
    Ok(socket)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, RemoteError> {
    let socket = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) => return Err(io_error(&error, &format!("connect to {addr}"))),
        Err(_) => {
            return Err(RemoteError {
                errno: libc::ETIMEDOUT,
                message: format!("connect to {addr} timed out after {CONNECT_TIMEOUT:?}"),
            });
        }
    };
    let _ = socket.set_nodelay(true);
    Ok(socket)
}

fn io_error(error: &std::io::Error, what: &str) -> RemoteError {
    RemoteError {
        errno: error.raw_os_error().unwrap_or(libc::EIO),
        message: format!("{what}: {error}"),
    }
}

/// The answer to request `id`: a response, or a file read's bytes waiting in a pipe.
async fn answer(agent: &Arc<Agent>, session: SessionId, id: u64, request: Request) -> AgentOut {
    let response = match request {
        // Resolved on this runtime, not a blocking thread: hickory is async, and its sockets
        // must be in the target's network namespace, as this runtime's threads are.
        Request::Dns(query) => {
            let resolver = agent.dns.get_or_init(|| pod_resolver(agent)).await;
            // Garbage without even an ID gets no answer, as from a nameserver: the client times
            // out as it would there.
            Ok(Response::Dns(
                resolver.answer(&query).await.unwrap_or_default(),
            ))
        }
        Request::TargetInfo => {
            blocking(agent, |agent| {
                let target = &agent.target;
                let env = target
                    .env()
                    .map_err(|error| remote(&error, error.errno()))?;
                let hostname = target
                    .hostname()
                    .map_err(|error| remote(&error, error.errno()))?;
                // Blocking threads of this runtime are in the target's network namespace.
                let addresses = crate::netns::addresses()
                    .map_err(|error| remote(&error, error.raw_os_error().unwrap_or(libc::EIO)))?;
                Ok(Response::TargetInfo(TargetInfo {
                    env,
                    hostname,
                    pid: target.pid(),
                    addresses,
                }))
            })
            .await
        }
        // Writable: the client proved the session token and chose its mode; its FUSE mount
        // refuses writes itself in read-only mode (see `fs` for the agent's own guard).
        Request::Fs(request) => {
            let served = blocking(agent, move |agent| {
                crate::fs::serve(&agent.target.root(), request, true)
                    .map_err(|error| remote(&error, error.errno()))
            })
            .await;
            match served {
                Ok(Answer::Read(FileBytes::Piped(data))) => return AgentOut::FileData { id, data },
                Ok(Answer::Read(FileBytes::Copied(bytes))) => {
                    Ok(Response::Fs(FsResponse::Data(bytes)))
                }
                Ok(Answer::Response(response)) => Ok(Response::Fs(response)),
                Err(error) => Err(error),
            }
        }
        // On this runtime: the redirect's nft runs in the target's network namespace.
        Request::Subscribe(subscription) => agent
            .incoming
            .subscribe(session, subscription)
            .await
            .map(|()| Response::Subscribed),
        Request::Unsubscribe { port } => agent
            .incoming
            .unsubscribe(session, port)
            .await
            .map(|()| Response::Unsubscribed),
    };
    AgentMessage::Response { id, response }.into()
}

/// What the session's writer sends: a message, or the answer to a file read whose bytes wait
/// in a pipe, to be spliced into the connection after it.
pub enum AgentOut {
    Message(AgentMessage),
    FileData { id: u64, data: PipedBytes },
}

impl From<AgentMessage> for AgentOut {
    fn from(message: AgentMessage) -> Self {
        AgentOut::Message(message)
    }
}

impl Outbound for AgentOut {
    fn encode_into(self, out: &mut Vec<u8>) -> Result<BulkOut, ProtocolError> {
        match self {
            AgentOut::Message(message) => message.encode_into(out),
            AgentOut::FileData { id, data } => {
                let mut message = AgentMessage::Response {
                    id,
                    response: Ok(Response::Fs(FsResponse::Data(Vec::new()))),
                };
                frame::encode_with_bulk_len(&mut message, data.len(), out)?;
                Ok(BulkOut::Piped(data))
            }
        }
    }
}

impl Outgoing for AgentOut {
    fn stream(frame: StreamFrame) -> Self {
        AgentOut::Message(AgentMessage::Stream(frame))
    }
}

/// Runs `work` where it may block: it reads /proc or the target's files, which can hang on a
/// slow filesystem.
async fn blocking<T: Send + 'static>(
    agent: &Arc<Agent>,
    work: impl FnOnce(&Agent) -> Result<T, RemoteError> + Send + 'static,
) -> Result<T, RemoteError> {
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || work(&agent))
        .await
        .unwrap_or_else(|error| {
            Err(RemoteError {
                errno: libc::EIO,
                message: format!("agent task failed: {error}"),
            })
        })
}

/// The target's resolver: its resolv.conf and hosts file, read inside its root.
async fn pod_resolver(agent: &Arc<Agent>) -> DnsResolver {
    let agent = agent.clone();
    let files = tokio::task::spawn_blocking(move || {
        let read = |path: &str| {
            files::read(&agent.target.root(), path, 0, MAX_FILE_READ)
                .and_then(|bytes| bytes.into_vec().map_err(io_err("read", path)))
                .inspect_err(|error| debug!(path, %error, "no DNS configuration file"))
                .ok()
        };
        (read("/etc/resolv.conf"), read("/etc/hosts"))
    })
    .await;
    let (resolv_conf, hosts) = files.unwrap_or_default();
    DnsResolver::new(resolv_conf.as_deref(), hosts.as_deref())
}

fn remote(error: &dyn std::fmt::Display, errno: i32) -> RemoteError {
    RemoteError {
        errno,
        message: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrord_link::endpoint::Endpoint;
    use std::io::Write;

    #[test]
    fn a_client_leaving_before_its_greeting_is_no_warning() {
        let io = |kind| SessionError::Greeting(GreetError::Io(std::io::Error::from(kind)));
        assert!(SessionError::Greeting(GreetError::Closed).left_before_greeting());
        assert!(io(std::io::ErrorKind::BrokenPipe).left_before_greeting());
        assert!(io(std::io::ErrorKind::ConnectionReset).left_before_greeting());
        assert!(!io(std::io::ErrorKind::PermissionDenied).left_before_greeting());
        assert!(!SessionError::HandshakeTimeout.left_before_greeting());
    }

    /// A file read whose bytes wait in a pipe reaches the client whole and in its place among
    /// the other messages, over either kind of connection.
    #[tokio::test]
    async fn piped_file_data_arrives_in_order_over_tcp_and_unix() {
        let path =
            std::env::temp_dir().join(format!("mirrord-server-piped-{}", std::process::id()));
        let content: Vec<u8> = (0..(3 << 20) + 5).map(|i: u32| (i % 249) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&content)
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let name = format!("unix:@mirrord-server-test-{}", std::process::id());
        for endpoint in [
            "127.0.0.1:0".parse::<Endpoint>().unwrap(),
            name.parse().unwrap(),
        ] {
            let listener = endpoint.bind().unwrap().into_async().unwrap();
            let (read_half, _keep) = listener.endpoint().connect().await.unwrap();
            let (_, write_half, _) = listener.accept().await.unwrap();
            let (out_tx, out_rx) = mpsc::channel::<AgentOut>(16);
            let writer = tokio::spawn(write_loop(write_half, out_rx));
            let mut sent = Vec::new();
            for (id, offset) in [(1u64, 0u64), (2, 1 << 20), (3, 3 << 20)] {
                let data = PipedBytes::from_file(&file, offset, 1 << 20)
                    .unwrap()
                    .unwrap();
                let len = data.len();
                out_tx.send(AgentOut::FileData { id, data }).await.unwrap();
                out_tx
                    .send(AgentMessage::Pong { nonce: id }.into())
                    .await
                    .unwrap();
                sent.push((id, content[offset as usize..offset as usize + len].to_vec()));
            }
            drop(out_tx);
            let mut reader = FrameReader::new(read_half);
            for (id, bytes) in sent {
                let expected = AgentMessage::Response {
                    id,
                    response: Ok(Response::Fs(FsResponse::Data(bytes))),
                };
                assert_eq!(reader.next::<AgentMessage>().await.unwrap(), expected);
                let pong = reader.next::<AgentMessage>().await.unwrap();
                assert_eq!(pong, AgentMessage::Pong { nonce: id });
            }
            writer.await.unwrap().unwrap();
        }
        std::fs::remove_file(path).unwrap();
    }
}
