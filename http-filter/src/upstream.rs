//! One app a client connection's requests are forwarded to (the original or the local one):
//! a single HTTP connection to it, opened on the first request that goes there, kept for the
//! next ones, and opened again when the app closed it. It speaks what the client speaks, since
//! the app served that client before the redirect.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

use crate::{Body, Error, Side};

/// A byte stream to an app.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Opens a new stream to an app; called once per upstream connection.
pub type Connector =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send>> + Send + Sync>;

/// Which HTTP the upstream connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

enum Sender {
    Http1(http1::SendRequest<Body>),
    /// Multiplexes: concurrent streams of the client share it.
    Http2(http2::SendRequest<Body>),
}

impl Sender {
    /// Waits until the connection takes a request: for HTTP/1, until the previous response
    /// has been read to its end. Fails when the app closed the connection.
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::Http1(sender) => sender.ready().await,
            Sender::Http2(sender) => sender.ready().await,
        }
    }

    fn send(&mut self, request: Request<Body>) -> Pin<Box<dyn Future<Output = SendResult> + Send>> {
        match self {
            Sender::Http1(sender) => Box::pin(sender.try_send_request(request)),
            Sender::Http2(sender) => Box::pin(sender.try_send_request(request)),
        }
    }
}

type SendResult = Result<Response<Incoming>, TrySendError<Request<Body>>>;

pub struct Upstream {
    side: Side,
    version: Version,
    connect: Connector,
    /// `None` until the first request, and while a request is being handed to the connection.
    sender: Mutex<Option<Sender>>,
}

impl Upstream {
    pub fn new(side: Side, version: Version, connect: Connector) -> Self {
        Upstream {
            side,
            version,
            connect,
            sender: Mutex::new(None),
        }
    }

    /// Forwards one request as it is and returns the app's response head, its body still
    /// streaming.
    ///
    /// A kept connection may have been closed by the app (an idle timeout) just as the request
    /// went out; when hyper hands the request back unsent, it is sent once more, on a
    /// connection that is still open or a new one, as HTTP clients do for a reused connection.
    /// A request that was sent is never sent twice.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, Error> {
        let mut request = request;
        let mut retried = false;
        loop {
            let (response, reused) = {
                let mut slot = self.sender.lock().await;
                // Another stream may have opened a new connection meanwhile (HTTP/2); a
                // closed one fails `ready`.
                let mut kept = slot.take();
                if let Some(sender) = &mut kept
                    && sender.ready().await.is_err()
                {
                    kept = None;
                }
                let reused = kept.is_some();
                let mut sender = match kept {
                    Some(sender) => sender,
                    None => self.open().await?,
                };
                let response = sender.send(request);
                *slot = Some(sender);
                (response, reused)
            };
            match response.await {
                Ok(response) => return Ok(response),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused && !retried => {
                        request = unsent;
                        retried = true;
                    }
                    _ => {
                        return Err(Error::Forward {
                            side: self.side,
                            source: failed.into_error(),
                        });
                    }
                },
            }
        }
    }

    async fn open(&self) -> Result<Sender, Error> {
        let side = self.side;
        let io = TokioIo::new(
            (self.connect)()
                .await
                .map_err(|source| Error::Connect { side, source })?,
        );
        let handshake = |source| Error::Handshake { side, source };
        match self.version {
            Version::Http1 => {
                let (sender, connection) = http1::Builder::new()
                    .preserve_header_case(true)
                    .handshake(io)
                    .await
                    .map_err(handshake)?;
                tokio::spawn(async move {
                    if let Err(error) = connection.with_upgrades().await {
                        tracing::debug!(%side, %error, "HTTP/1 connection to an app ended");
                    }
                });
                Ok(Sender::Http1(sender))
            }
            Version::Http2 => {
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(handshake)?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%side, %error, "HTTP/2 connection to an app ended");
                    }
                });
                Ok(Sender::Http2(sender))
            }
        }
    }
}
