//! One app a client connection's requests are forwarded to (the original or the local one):
//! a single HTTP connection to it, opened on the first request that goes there, kept for the
//! next ones, and opened again when the app closed it. It speaks what the client speaks, since
//! the app served that client before the redirect.
//!
//! A connection's driver (hyper's `Connection` future, which does its reads and writes) runs in
//! the task that serves the client connection, handed over through [`Drive::Serving`], rather
//! than in a task of its own: every request and every response crosses between the server side
//! and the client side of hyper, and within one task each crossing is a re-poll, not a wake-up
//! of another task.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Mutex, mpsc};

use crate::{Body, Error, Side};

/// A byte stream to an app.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Opens a new stream to an app; called once per upstream connection.
pub type Connector =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send>> + Send + Sync>;

/// A connection's driver: resolves once the connection is done (closed, failed, or upgraded
/// and handed over).
pub type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the drivers of an upstream's connections run.
#[derive(Clone)]
pub enum Drive {
    /// In a task of their own (for an upstream used away from the serving task: mirroring).
    Spawn,
    /// upstream --connection drivers--> the task serving the client connection.
    Serving(mpsc::UnboundedSender<Driver>),
}

impl Drive {
    fn run(&self, driver: Driver) {
        match self {
            Drive::Spawn => drop(tokio::spawn(driver)),
            Drive::Serving(drivers_tx) => {
                if let Err(unsent) = drivers_tx.send(driver) {
                    // The serving task is gone: its requests with it, but a connection handed
                    // over by an upgrade may still need its driver to finish.
                    tokio::spawn(unsent.0);
                }
            }
        }
    }
}

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

    /// Hands the request to the connection at once; the future waits for the response head.
    fn send(
        &mut self,
        request: Request<Body>,
    ) -> Sending<
        impl Future<Output = SendResult> + Send + use<>,
        impl Future<Output = SendResult> + Send + use<>,
    > {
        match self {
            Sender::Http1(sender) => Sending::Http1(sender.try_send_request(request)),
            Sender::Http2(sender) => Sending::Http2(sender.try_send_request(request)),
        }
    }
}

/// A request handed to its connection, until the response head comes: an enum of the two
/// futures rather than a boxed one, so forwarding a request allocates nothing of its own.
enum Sending<H1, H2> {
    Http1(H1),
    Http2(H2),
}

impl<H1: Future<Output = SendResult>, H2: Future<Output = SendResult>> Sending<H1, H2> {
    async fn response(self) -> SendResult {
        match self {
            Sending::Http1(sending) => sending.await,
            Sending::Http2(sending) => sending.await,
        }
    }
}

type SendResult = Result<Response<Incoming>, TrySendError<Request<Body>>>;

pub struct Upstream {
    side: Side,
    version: Version,
    connect: Connector,
    drive: Drive,
    /// `None` until the first request, and while a request is being handed to the connection.
    sender: Mutex<Option<Sender>>,
}

impl Upstream {
    pub fn new(side: Side, version: Version, connect: Connector, drive: Drive) -> Self {
        Upstream {
            side,
            version,
            connect,
            drive,
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
            match response.response().await {
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
                self.drive.run(Box::pin(async move {
                    if let Err(error) = connection.with_upgrades().await {
                        tracing::debug!(%side, %error, "HTTP/1 connection to an app ended");
                    }
                }));
                Ok(Sender::Http1(sender))
            }
            Version::Http2 => {
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(handshake)?;
                self.drive.run(Box::pin(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%side, %error, "HTTP/2 connection to an app ended");
                    }
                }));
                Ok(Sender::Http2(sender))
            }
        }
    }
}
