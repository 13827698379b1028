//! Where each request of one client connection goes, and its response back: the HTTP server
//! side's service. A request is forwarded as it came (method, target, version, headers, body
//! and trailers streaming); only the choice of app depends on the filter. Nothing here may
//! let the local app delay or fail a request it does not answer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use mirrord_protocol::incoming::IncomingMode;
use tokio::sync::mpsc;

use crate::filter::Filter;
use crate::upstream::Upstream;
use crate::{Body, BoxError, Error};

/// Copies of matched requests waiting for the local app in mirror mode; more are dropped, so a
/// slow local app costs memory for at most this many (each at most the body limit).
const MIRROR_QUEUE: usize = 16;
/// How long the local app gets for a mirrored request and its whole response; the client has
/// had its answer from the original app long before, this only bounds the agent's work.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Router {
    original: Upstream,
    /// The sessions' claims, in order: the first steal whose filter matches answers a request.
    locals: Vec<Local>,
    mirror_body_limit: usize,
}

/// One session's local app and the requests it takes.
pub struct Local {
    filter: Arc<Filter>,
    to_local: ToLocal,
}

enum ToLocal {
    /// Steal: matching requests are answered by the local app.
    Steal(Upstream),
    /// Mirror: copies of matching requests, complete with their bodies, for [`mirror`].
    Mirror(mpsc::Sender<Request<Body>>),
}

impl Local {
    /// In mirror mode, spawns the task that feeds the local app; it ends once the router is
    /// dropped and the copies already queued are answered.
    pub fn new(filter: Arc<Filter>, mode: IncomingMode, local: Upstream) -> Self {
        let to_local = match mode {
            IncomingMode::Steal => ToLocal::Steal(local),
            IncomingMode::Mirror => {
                let (copies_tx, copies_rx) = mpsc::channel(MIRROR_QUEUE);
                tokio::spawn(mirror(local, copies_rx));
                ToLocal::Mirror(copies_tx)
            }
        };
        Local { filter, to_local }
    }
}

impl Router {
    pub fn new(original: Upstream, locals: Vec<Local>, mirror_body_limit: usize) -> Self {
        Router {
            original,
            locals,
            mirror_body_limit,
        }
    }

    /// The HTTP server's service for one request. Never fails: an app that cannot be reached
    /// is the client's `502`, and the connection goes on.
    pub async fn route(
        self: Arc<Self>,
        mut request: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let client_upgrade = asks_upgrade(&request).then(|| hyper::upgrade::on(&mut request));
        let connect = request.method() == Method::CONNECT;
        let matching = || {
            self.locals
                .iter()
                .filter(|local| local.filter.matches(&request))
        };
        let upstream = matching()
            .find_map(|local| match &local.to_local {
                ToLocal::Steal(upstream) => Some(upstream),
                ToLocal::Mirror(_) => None,
            })
            .unwrap_or(&self.original);
        // An upgraded connection is a byte stream from then on: there is nothing to copy as
        // requests, and a second app must not switch protocols on the client's behalf.
        let copies_to: Vec<_> = matching()
            .filter_map(|local| match &local.to_local {
                ToLocal::Mirror(copies_tx) if client_upgrade.is_none() => Some(copies_tx.clone()),
                _ => None,
            })
            .collect();
        let request = if copies_to.is_empty() {
            request.map(box_body)
        } else {
            let copy = MirrorCopy::new(&request, copies_to, self.mirror_body_limit);
            request.map(|body| Tee::new(body, copy).boxed())
        };
        let mut response = match upstream.send(request).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, "request not forwarded");
                return Ok(bad_gateway(&error));
            }
        };
        if let Some(client_upgrade) = client_upgrade {
            let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS
                || (connect && response.status().is_success());
            if switched {
                let app_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(pipe_upgraded(client_upgrade, app_upgrade));
            }
        }
        Ok(response.map(box_body))
    }
}

/// hyper hands over the connection after a `101` (or a `CONNECT`'s `2xx`) only to whoever
/// asked with [`hyper::upgrade::on`] before the request went on.
fn asks_upgrade<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT || request.headers().contains_key(header::UPGRADE)
}

fn box_body(body: Incoming) -> Body {
    body.map_err(BoxError::from).boxed()
}

/// The client's answer when the app that should have answered could not be reached.
pub fn bad_gateway(error: &Error) -> Response<Body> {
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(format!("mirrord: {error}\n")))
            .map_err(BoxError::from)
            .boxed(),
    );
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Joins the client's upgraded connection to the app's, both ways, until either ends.
async fn pipe_upgraded(client: OnUpgrade, app: OnUpgrade) {
    let (client, app) = match tokio::try_join!(client, app) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%error, "upgrade not completed");
            return;
        }
    };
    let (mut client, mut app) = (TokioIo::new(client), TokioIo::new(app));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut app).await {
        tracing::debug!(%error, "upgraded connection ended");
    }
}

/// Sends the copies to the local app one at a time over one kept connection and throws the
/// answers away; failures only reach the log.
async fn mirror(local: Upstream, mut copies_rx: mpsc::Receiver<Request<Body>>) {
    while let Some(copy) = copies_rx.recv().await {
        let answered = async {
            let response = local.send(copy).await?;
            // Read to the end: an HTTP/1 connection takes the next request only then.
            response
                .into_body()
                .collect()
                .await
                .map_err(|source| Error::Forward {
                    side: crate::Side::Local,
                    source,
                })
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, answered).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(%error, "mirrored request failed"),
            Err(_) => tracing::debug!("mirrored request timed out"),
        }
    }
}

/// A matched request's copy being filled while its body streams to the app that answers.
struct MirrorCopy {
    head: Request<()>,
    body: BytesMut,
    trailers: Option<HeaderMap>,
    limit: usize,
    /// The mirroring sessions whose filters matched.
    copies_to: Vec<mpsc::Sender<Request<Body>>>,
}

impl MirrorCopy {
    /// The head is cloned field by field: `Parts` is not `Clone` (extensions), and none of the
    /// extensions hyper puts on a served request means anything to a new connection.
    fn new<B>(
        request: &Request<B>,
        copies_to: Vec<mpsc::Sender<Request<Body>>>,
        limit: usize,
    ) -> Self {
        let mut head = Request::new(());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.version_mut() = request.version();
        *head.headers_mut() = request.headers().clone();
        MirrorCopy {
            head,
            body: BytesMut::new(),
            trailers: None,
            limit,
            copies_to,
        }
    }

    /// Takes a frame in; `false` once the body outgrew the limit and the copy is abandoned
    /// (a copy with part of its body would be a different request).
    fn add(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            if self.body.len() + data.len() > self.limit {
                tracing::debug!(limit = self.limit, "request body too large to mirror");
                return false;
            }
            self.body.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
        }
        true
    }

    fn send(self) {
        let data = Some(self.body.freeze()).filter(|data| !data.is_empty());
        for copies_tx in &self.copies_to {
            let mut head = Request::new(());
            *head.method_mut() = self.head.method().clone();
            *head.uri_mut() = self.head.uri().clone();
            *head.version_mut() = self.head.version();
            *head.headers_mut() = self.head.headers().clone();
            let body = Buffered {
                data: data.clone(),
                trailers: self.trailers.clone(),
            };
            let (head, ()) = head.into_parts();
            if copies_tx
                .try_send(Request::from_parts(head, body.boxed()))
                .is_err()
            {
                tracing::debug!("local app behind on mirrored requests, one dropped");
            }
        }
    }
}

/// A request body on its way to the original app that also fills a [`MirrorCopy`]; the copy goes to
/// the local app once the whole body has passed.
struct Tee {
    inner: Incoming,
    copy: Option<MirrorCopy>,
}

impl Tee {
    fn new(inner: Incoming, copy: MirrorCopy) -> Self {
        Tee {
            inner,
            copy: Some(copy),
        }
    }

    fn finish_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(copy) = self.copy.take()
        {
            copy.send();
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(copy) = &mut this.copy
                    && !copy.add(frame)
                {
                    this.copy = None;
                }
                this.finish_if_ended();
            }
            Poll::Ready(None) => {
                if let Some(copy) = this.copy.take() {
                    copy.send();
                }
            }
            // The client went away mid-body: the request never happened.
            Poll::Ready(Some(Err(_))) => this.copy = None,
            Poll::Pending => {}
        }
        polled.map(|frame| frame.map(|frame| frame.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    /// hyper may stop polling once a body says it has ended, or never poll one that was empty
    /// from the start (a `GET`): the copy is complete then all the same.
    fn drop(&mut self) {
        self.finish_if_ended();
    }
}

/// A mirrored request's whole body and its trailers.
struct Buffered {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for Buffered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match (this.data.take(), this.trailers.take()) {
            (Some(data), trailers) => {
                this.trailers = trailers;
                Some(Frame::data(data))
            }
            (None, trailers) => trailers.map(Frame::trailers),
        };
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |data| data.len() as u64))
    }
}
