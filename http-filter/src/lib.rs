//! Routes one redirected client connection request by request: HTTP requests that match a
//! subscription's filter go to the developer's local app, every other request — and every
//! connection that is not HTTP — goes to the pod's original app, unchanged. It must never alter
//! what the original app sees for traffic the filter does not take, and the local app must
//! never be able to delay or fail a request it does not answer.
//!
//! The agent hands each redirected connection of a filtered subscription to [`serve`], with
//! two ways to open a byte stream: to the original app (the connection's original destination)
//! and to the local app (a stream to the CLI). The rules:
//!
//! - **Detection.** The first bytes decide, within [`Options::detect_timeout`]:
//!   the HTTP/2 connection preface means h2c with prior knowledge; an HTTP/1.x request line
//!   means HTTP/1; anything else, the client closing, or silence until the timeout means raw
//!   TCP. Raw TCP is piped both ways to the original app, the bytes already read first. TLS
//!   (HTTPS) is raw TCP here: no filter can see inside it.
//! - **Per request.** HTTP/1 is served with keep-alive and each request is routed on its own;
//!   HTTP/2 routes each stream on its own, concurrently. A request is forwarded as it came
//!   (method, target, version, headers — their case too for HTTP/1 — body and trailers,
//!   streaming) and its response comes back the same way. Each app gets one connection at a time
//!   per client connection, opened on the first request that goes there, kept for the next
//!   ones, opened again when the app closed it; it speaks what the client speaks.
//! - **Upgrades.** A request that asks to switch protocols (`Upgrade`, e.g. WebSocket, or
//!   `CONNECT`) goes where the filter says, and after a `101` (or a `CONNECT`'s `2xx`) the
//!   client's connection is joined to that app's, byte for byte, until either ends (so after
//!   an `Upgrade: h2c`, the whole HTTP/2 connection belongs to the app the first request chose).
//! - **Steal** ([`IncomingMode::Steal`]): a matching request is answered by the local app; when
//!   it cannot be reached the client gets `502 Bad Gateway` with a one-line body naming why
//!   (as for the original app and requests that do not match).
//! - **Mirror** ([`IncomingMode::Mirror`]): the original app answers every request; a copy of
//!   each matching one goes to the local app, and its answer is thrown away. The copy is made
//!   while the body streams to the original app and sent once the body is complete; a body
//!   over [`Options::mirror_body_limit`] is not copied, and copies the local app is too slow
//!   for are dropped. Upgrade requests are not copied.
//! - **Errors.** Bytes that are not HTTP after a connection was detected as HTTP get hyper's
//!   `400 Bad Request` and end the connection; [`serve`] then returns the error, on one line,
//!   for the agent's log.

mod detect;
mod filter;
mod prefixed;
mod route;
mod upstream;

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

pub use filter::{Filter, FilterError};
pub use mirrord_protocol::incoming::{HttpFilter, IncomingMode};

use detect::Protocol;
use prefixed::Prefixed;
use route::{Local, Router};
use upstream::{Connector, Io, Upstream, Version};

/// How long a client gets to show it speaks HTTP before its connection is piped to the
/// original app as raw TCP. HTTP clients send their request at once; a server-speaks-first
/// protocol (SMTP, MySQL) says nothing, and this is how long its client waits for a greeting.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request body copied to the local app in mirror mode.
pub const MIRROR_BODY_LIMIT: usize = 256 * 1024;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the router hands on: a request's towards an app, a response's towards the client.
pub(crate) type Body = BoxBody<Bytes, BoxError>;

/// What [`serve`] may be tuned with; the agent uses [`Options::default`], tests shorten the
/// detection.
#[derive(Debug, Clone)]
pub struct Options {
    /// See [`DETECT_TIMEOUT`].
    pub detect_timeout: Duration,
    /// See [`MIRROR_BODY_LIMIT`].
    pub mirror_body_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            detect_timeout: DETECT_TIMEOUT,
            mirror_body_limit: MIRROR_BODY_LIMIT,
        }
    }
}

/// Which app a connection or request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Original,
    Local,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Original => "original",
            Side::Local => "local",
        })
    }
}

/// Why a client connection ended badly, or (as a 502's body) why a request was not answered.
/// [`FilterError`] stays apart: a filter is compiled when a port is subscribed, long before any
/// connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the client's first bytes: {0}")]
    Detect(#[source] io::Error),
    #[error("cannot connect to the {side} app: {source}")]
    Connect { side: Side, source: io::Error },
    #[error("HTTP handshake with the {side} app failed: {}", causes(source))]
    Handshake { side: Side, source: hyper::Error },
    #[error("forwarding a request to the {side} app failed: {}", causes(source))]
    Forward { side: Side, source: hyper::Error },
    #[error("serving HTTP to the client: {}", causes(.0))]
    Serve(#[source] hyper::Error),
    #[error("piping a raw TCP connection to the original app: {0}")]
    Pipe(#[source] io::Error),
}

/// A hyper error's message names only its kind ("connection closed before message
/// completed"); the reason (an `io::Error`) is its source. Both, on one line, each once.
fn causes(error: &hyper::Error) -> String {
    let mut line = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !line.contains(&cause_text) {
            line.push_str(": ");
            line.push_str(&cause_text);
        }
        source = cause.source();
    }
    line
}

/// One session's claim on a client connection's requests: those `filter` matches go to its
/// local app (steal) or are copied to it (mirror). `connect_local` is called each time a new
/// connection to that app is needed: on the first request that goes there, and again only
/// after the app closed the previous one.
pub struct LocalRoute {
    filter: Arc<Filter>,
    mode: IncomingMode,
    connect: Connector,
}

impl LocalRoute {
    pub fn new<L, FL, IL>(filter: Arc<Filter>, mode: IncomingMode, connect_local: L) -> Self
    where
        L: Fn() -> FL + Send + Sync + 'static,
        FL: Future<Output = io::Result<IL>> + Send + 'static,
        IL: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        LocalRoute {
            filter,
            mode,
            connect: connector(connect_local),
        }
    }
}

/// Serves one redirected client connection of one session's filter: [`serve_routes`] with a
/// single [`LocalRoute`].
pub async fn serve<C, O, FO, IO, L, FL, IL>(
    client: C,
    filter: Arc<Filter>,
    mode: IncomingMode,
    connect_original: O,
    connect_local: L,
    options: Options,
) -> Result<(), Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    O: Fn() -> FO + Send + Sync + 'static,
    FO: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    L: Fn() -> FL + Send + Sync + 'static,
    FL: Future<Output = io::Result<IL>> + Send + 'static,
    IL: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let route = LocalRoute::new(filter, mode, connect_local);
    serve_routes(client, vec![route], connect_original, options).await
}

/// Serves one redirected client connection until it ends (see the crate documentation for the
/// rules), for several sessions' filters at once: a request goes to the first stealing
/// session whose filter matches it, else to the original app, and every mirroring session
/// whose filter matches it gets a copy. `connect_original` is called each time a new
/// connection to the original app is needed (never when no request goes there).
///
/// `Ok(())` when the client closed the connection between requests (or, for raw TCP, when both
/// directions ended); otherwise the reason, on one line. Failing to reach an app for one
/// request is that request's `502`, not an error of the connection.
pub async fn serve_routes<C, O, FO, IO>(
    client: C,
    routes: Vec<LocalRoute>,
    connect_original: O,
    options: Options,
) -> Result<(), Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    O: Fn() -> FO + Send + Sync + 'static,
    FO: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut client = client;
    let (protocol, head) = detect::read_head(&mut client, options.detect_timeout)
        .await
        .map_err(Error::Detect)?;
    tracing::trace!(?protocol, "client connection detected");
    let client = Prefixed::new(head, client);
    let version = match protocol {
        Protocol::Raw => return pipe_raw(client, connect_original).await,
        Protocol::Http1 => Version::Http1,
        Protocol::Http2 => Version::Http2,
    };
    let locals = routes
        .into_iter()
        .map(|route| {
            Local::new(
                route.filter,
                route.mode,
                Upstream::new(Side::Local, version, route.connect),
            )
        })
        .collect();
    let router = Arc::new(Router::new(
        Upstream::new(Side::Original, version, connector(connect_original)),
        locals,
        options.mirror_body_limit,
    ));
    let service = hyper::service::service_fn(move |request| router.clone().route(request));
    let client = TokioIo::new(client);
    // No `Date` of our own: the app's response goes back as the app wrote it.
    let served = match version {
        Version::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .preserve_header_case(true)
                // A client may shut down its sending side once its request is out, and still
                // expects the answer, as the original app would give it.
                .half_close(true)
                .auto_date_header(false)
                .serve_connection(client, service)
                .with_upgrades()
                .await
        }
        Version::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .auto_date_header(false)
                .serve_connection(client, service)
                .await
        }
    };
    served.map_err(Error::Serve)
}

async fn pipe_raw<C, O, FO, IO>(mut client: C, connect_original: O) -> Result<(), Error>
where
    C: AsyncRead + AsyncWrite + Unpin,
    O: Fn() -> FO,
    FO: Future<Output = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut original = connect_original().await.map_err(|source| Error::Connect {
        side: Side::Original,
        source,
    })?;
    tokio::io::copy_bidirectional(&mut client, &mut original)
        .await
        .map_err(Error::Pipe)?;
    Ok(())
}

fn connector<F, Fut, S>(connect: F) -> Connector
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Arc::new(move || {
        let connecting = connect();
        Box::pin(async move { Ok(Box::new(connecting.await?) as Box<dyn Io>) })
    })
}
