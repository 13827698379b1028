//! Where a session's connection runs: TCP (`HOST:PORT`), or a Unix stream socket
//! (`unix:PATH`, or `unix:@NAME` for an abstract one, which leaves no file behind). A local
//! agent is reached over an abstract Unix socket: without TCP's segments and acknowledgements,
//! a file read costs the agent less CPU than over loopback TCP (figures in
//! docs/architecture.md).

use std::fmt;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr as UnixAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// The reading half of a connection, whatever carries it.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a connection, whatever carries it; it can also take bytes from a pipe
/// without copying them through memory ([`WriteHalf::splice_from`]).
pub struct WriteHalf(WriteSocket);

enum WriteSocket {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
    /// Any other byte stream (a Kubernetes port-forward); it cannot take a splice.
    Stream(Box<dyn AsyncWrite + Send + Unpin>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    UnixPath(PathBuf),
    UnixAbstract(String),
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an address: use HOST:PORT, unix:PATH or unix:@NAME")]
pub struct BadEndpoint(String);

impl FromStr for Endpoint {
    type Err = BadEndpoint;

    fn from_str(text: &str) -> Result<Endpoint, BadEndpoint> {
        let bad = || BadEndpoint(text.to_owned());
        match text.strip_prefix("unix:") {
            Some(rest) => match rest.strip_prefix('@') {
                Some("") => Err(bad()),
                Some(name) => Ok(Endpoint::UnixAbstract(name.to_owned())),
                None if rest.is_empty() => Err(bad()),
                None => Ok(Endpoint::UnixPath(PathBuf::from(rest))),
            },
            None if text
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()) =>
            {
                Ok(Endpoint::Tcp(text.to_owned()))
            }
            None => Err(bad()),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => f.write_str(addr),
            Endpoint::UnixPath(path) => write!(f, "unix:{}", path.display()),
            Endpoint::UnixAbstract(name) => write!(f, "unix:@{name}"),
        }
    }
}

impl Endpoint {
    /// The Unix socket address; `None` for TCP.
    fn unix_addr(&self) -> Option<std::io::Result<UnixAddr>> {
        match self {
            Endpoint::Tcp(_) => None,
            Endpoint::UnixPath(path) => Some(UnixAddr::from_pathname(path)),
            Endpoint::UnixAbstract(name) => Some(UnixAddr::from_abstract_name(name)),
        }
    }

    /// Opens a connection, split into its halves.
    pub async fn connect(&self) -> std::io::Result<(ReadHalf, WriteHalf)> {
        match self.unix_addr() {
            None => Ok(split_tcp(TcpStream::connect(self.to_string()).await?)),
            Some(addr) => {
                // A Unix connect completes at once (or fails): nothing to wait for.
                let socket = std::os::unix::net::UnixStream::connect_addr(&addr?)?;
                socket.set_nonblocking(true)?;
                Ok(split_unix(UnixStream::from_std(socket)?))
            }
        }
    }

    /// Binds a listener without a runtime, so the caller chooses the thread (and with it the
    /// network namespace) it binds in. Port 0 picks a free port.
    pub fn bind(&self) -> std::io::Result<BoundListener> {
        match self.unix_addr() {
            None => {
                let listener = std::net::TcpListener::bind(self.to_string())?;
                listener.set_nonblocking(true)?;
                let shown = Endpoint::Tcp(listener.local_addr()?.to_string());
                Ok(BoundListener {
                    socket: BoundSocket::Tcp(listener),
                    endpoint: shown,
                })
            }
            Some(addr) => {
                let listener = bind_unix(self, &addr?)?;
                listener.set_nonblocking(true)?;
                Ok(BoundListener {
                    socket: BoundSocket::Unix(listener),
                    endpoint: self.clone(),
                })
            }
        }
    }
}

/// Binds `addr`, replacing a socket file that nobody listens on any more (left by an agent that
/// was killed); a live one is left alone and the bind fails with "address in use".
fn bind_unix(
    endpoint: &Endpoint,
    addr: &UnixAddr,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
    match StdListener::bind_addr(addr) {
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            let Endpoint::UnixPath(path) = endpoint else {
                return Err(error);
            };
            match StdStream::connect_addr(addr) {
                Err(refused) if refused.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                    StdListener::bind_addr(addr)
                }
                _ => Err(error),
            }
        }
        bound => bound,
    }
}

fn split_tcp(socket: TcpStream) -> (ReadHalf, WriteHalf) {
    // Small frames (a lookup, a DNS answer) must not wait for Nagle.
    socket.set_nodelay(true).ok();
    let (read, write) = socket.into_split();
    (Box::new(read), WriteHalf(WriteSocket::Tcp(write)))
}

/// What a Unix link's sender may have queued at its receiver, as the kernel counts it (twice
/// the bytes asked for). At the default, `net.core.wmem_default` (208 KiB, less than one
/// 256 KiB frame), a bulk stream's writer kept waiting for the reader to catch up: with 1 MiB,
/// a stream through a local agent went from 10.8 to 13.5 Gbit/s up and 12.4 to 13.8 down. More
/// was no faster for one stream and slower for a thousand: frames of every stream wait in one
/// queue (docs/architecture.md).
const UNIX_SEND_BUFFER: usize = 1 << 20;

/// Raises the socket's send buffer to [`UNIX_SEND_BUFFER`]: past `net.core.wmem_max` with
/// CAP_NET_ADMIN, up to it without. Only a Unix socket: TCP sizes its own buffers, and a fixed
/// size would turn that off. It is a limit, not memory: nothing is held until bytes wait.
fn widen_send_buffer(socket: &UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let asked = UNIX_SEND_BUFFER / 2;
    let widened = setsockopt(socket, sockopt::SndBufForce, &asked)
        .or_else(|_| setsockopt(socket, sockopt::SndBuf, &asked));
    if let Err(error) = widened {
        tracing::debug!(%error, "could not widen the link's send buffer");
    }
}

fn split_unix(socket: UnixStream) -> (ReadHalf, WriteHalf) {
    widen_send_buffer(&socket);
    let (read, write) = socket.into_split();
    (Box::new(read), WriteHalf(WriteSocket::Unix(write)))
}

/// The halves of a connection that is neither TCP nor a Unix socket of ours (a Kubernetes
/// port-forward). Its writing half takes no splice: only the agent splices, into its sockets.
pub fn split_stream<S>(stream: S) -> (ReadHalf, WriteHalf)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    (
        Box::new(read),
        WriteHalf(WriteSocket::Stream(Box::new(write))),
    )
}

impl WriteHalf {
    /// Moves `len` bytes from `pipe` into the connection. The socket takes references to the
    /// pipe's pages rather than a copy of them.
    pub async fn splice_from(
        &mut self,
        pipe: BorrowedFd<'_>,
        mut len: usize,
    ) -> std::io::Result<()> {
        while len > 0 {
            let moved = match &self.0 {
                WriteSocket::Tcp(half) => {
                    let socket: &TcpStream = half.as_ref();
                    socket.writable().await?;
                    socket.try_io(Interest::WRITABLE, || splice(pipe, socket.as_raw_fd(), len))
                }
                WriteSocket::Unix(half) => {
                    let socket: &UnixStream = half.as_ref();
                    socket.writable().await?;
                    socket.try_io(Interest::WRITABLE, || splice(pipe, socket.as_raw_fd(), len))
                }
                WriteSocket::Stream(_) => return Err(std::io::ErrorKind::Unsupported.into()),
            };
            match moved {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => len -= n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

/// One `splice` from `pipe` into `socket`; `WouldBlock` when the socket is full.
fn splice(pipe: BorrowedFd<'_>, socket: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: both descriptors are open for the call; no offsets (neither is seekable).
    let n = unsafe {
        libc::splice(
            pipe.as_raw_fd(),
            std::ptr::null_mut(),
            socket,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

macro_rules! each_socket {
    ($self:ident, $half:ident => $body:expr) => {
        match &mut $self.get_mut().0 {
            WriteSocket::Tcp($half) => $body,
            WriteSocket::Unix($half) => $body,
            WriteSocket::Stream($half) => $body,
        }
    };
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each_socket!(self, half => Pin::new(half).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each_socket!(self, half => Pin::new(half).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each_socket!(self, half => Pin::new(half).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each_socket!(self, half => Pin::new(half).poll_shutdown(cx))
    }
}

enum BoundSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// A bound listener not yet registered with a runtime.
pub struct BoundListener {
    socket: BoundSocket,
    /// The bound address, with the port chosen for port 0.
    endpoint: Endpoint,
}

impl BoundListener {
    /// Registers the listener with the current runtime.
    pub fn into_async(self) -> std::io::Result<Listener> {
        let socket = match self.socket {
            BoundSocket::Tcp(listener) => ListenerSocket::Tcp(TcpListener::from_std(listener)?),
            BoundSocket::Unix(listener) => ListenerSocket::Unix(UnixListener::from_std(listener)?),
        };
        Ok(Listener {
            socket,
            endpoint: self.endpoint,
        })
    }
}

enum ListenerSocket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Accepts connections; a Unix socket file it bound is removed when it is dropped.
pub struct Listener {
    socket: ListenerSocket,
    endpoint: Endpoint,
}

impl Listener {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The next connection, split, and who made it (for logs).
    pub async fn accept(&self) -> std::io::Result<(ReadHalf, WriteHalf, String)> {
        match &self.socket {
            ListenerSocket::Tcp(listener) => {
                let (socket, peer) = listener.accept().await?;
                let (read, write) = split_tcp(socket);
                Ok((read, write, peer.to_string()))
            }
            ListenerSocket::Unix(listener) => {
                let (socket, _) = listener.accept().await?;
                let (read, write) = split_unix(socket);
                Ok((read, write, self.endpoint.to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Endpoint::UnixPath(path) = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn addresses_parse_and_print_back() {
        for text in [
            "127.0.0.1:0",
            "localhost:7777",
            "[::1]:9",
            "unix:/run/agent.sock",
            "unix:@mirrord-agent-1",
        ] {
            let endpoint: Endpoint = text.parse().unwrap();
            assert_eq!(endpoint.to_string(), text);
        }
        assert_eq!(
            "unix:@x".parse::<Endpoint>().unwrap(),
            Endpoint::UnixAbstract("x".into())
        );
    }

    #[test]
    fn malformed_addresses_are_refused_with_the_forms_that_work() {
        for text in ["", "unix:", "unix:@", "127.0.0.1", "host:port", ":80"] {
            let error = text.parse::<Endpoint>().unwrap_err().to_string();
            assert!(
                error.contains("HOST:PORT, unix:PATH or unix:@NAME"),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn a_unix_path_listener_serves_and_removes_its_file() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir =
            std::env::temp_dir().join(format!("mirrord-endpoint-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let endpoint = Endpoint::UnixPath(dir.join("agent.sock"));
        let listener = endpoint.bind().unwrap().into_async().unwrap();
        let (_, mut write) = endpoint.connect().await.unwrap();
        write.write_all(b"hello").await.unwrap();
        let (mut read, _, peer) = listener.accept().await.unwrap();
        let mut got = [0u8; 5];
        read.read_exact(&mut got).await.unwrap();
        assert_eq!(
            (&got, peer.as_str()),
            (b"hello", endpoint.to_string().as_str())
        );
        let in_use = endpoint.bind().err().map(|error| error.kind());
        assert_eq!(in_use, Some(std::io::ErrorKind::AddrInUse));
        drop(listener);
        assert!(!dir.join("agent.sock").exists());

        // A file left by a listener that is gone (a killed agent) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(dir.join("agent.sock")).unwrap();
        drop(stale);
        let listener = endpoint.bind().unwrap().into_async().unwrap();
        let (_, mut write) = endpoint.connect().await.unwrap();
        write.write_all(b"again").await.unwrap();
        listener.accept().await.unwrap();
        drop(listener);
        std::fs::remove_dir(&dir).unwrap();
    }

    /// Each side of a Unix link can queue several frames, not the 208 KiB a Unix socket takes
    /// by default, before its peer reads: what keeps a bulk stream from stalling on the link.
    #[tokio::test]
    async fn either_side_of_a_unix_link_queues_three_frames_before_its_peer_reads() {
        use tokio::io::AsyncWriteExt;
        let endpoint = Endpoint::UnixAbstract(format!("mirrord-test-{}", std::process::id()));
        let listener = endpoint.bind().unwrap().into_async().unwrap();
        let (_connected_read, mut connected) = endpoint.connect().await.unwrap();
        let (_accepted_read, mut accepted, _) = listener.accept().await.unwrap();
        let three_frames = vec![7u8; 768 << 10];
        for (side, write) in [("connecting", &mut connected), ("accepting", &mut accepted)] {
            let queued =
                tokio::time::timeout(Duration::from_secs(5), write.write_all(&three_frames)).await;
            assert!(
                queued.is_ok(),
                "the {side} side waited before 768 KiB were queued"
            );
        }
    }
}
