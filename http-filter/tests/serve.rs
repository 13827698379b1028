//! End to end over loopback: a client talks to a proxy port whose one connection is handed to
//! `serve`, which routes to an "original" app answering `remote` and a "local" app answering
//! `local`, both real HTTP servers (or raw sockets where the bytes themselves matter).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mirrord_http_filter::{
    Error, Filter, HttpFilter, IncomingMode, LocalRoute, Options, serve, serve_routes,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SHORT_DETECT: Duration = Duration::from_millis(200);

/// Every test ends within this, or fails instead of hanging the suite.
async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("test timed out")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Http {
    V1,
    V2,
}

/// What an app was asked.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    version: http::Version,
    body: Bytes,
}

/// An HTTP server answering every request with its name as the body and an `x-app` header;
/// `grpc` requests also get the trailer `grpc-status: 0`, `Upgrade` requests a `101`, after
/// which it writes `<name>:` and echoes.
struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<AtomicUsize>,
}

impl App {
    async fn start(name: &'static str, http: Http) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = App {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            accepted: Arc::default(),
        };
        let (seen, accepted) = (app.seen.clone(), app.accepted.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                accepted.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                let service =
                    hyper::service::service_fn(move |request| answer(name, seen.clone(), request));
                let io = TokioIo::new(stream);
                tokio::spawn(async move {
                    // A client going away mid-connection is not the app's failure.
                    let _ = match http {
                        Http::V1 => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .with_upgrades()
                                .await
                        }
                        Http::V2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await
                        }
                    };
                });
            }
        });
        app
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

type AppBody = BoxBody<Bytes, hyper::Error>;

async fn answer(
    name: &'static str,
    seen: Arc<Mutex<Vec<Seen>>>,
    mut request: Request<Incoming>,
) -> Result<Response<AppBody>, hyper::Error> {
    if request.headers().contains_key(header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let upgraded = TokioIo::new(upgrade.await.unwrap());
            let (mut read, mut write) = tokio::io::split(upgraded);
            write
                .write_all(format!("{name}:").as_bytes())
                .await
                .unwrap();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .header("x-app", name)
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap();
        return Ok(response);
    }
    let grpc = request.headers().get(header::CONTENT_TYPE)
        == Some(&HeaderValue::from_static("application/grpc"));
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        version: parts.version,
        body,
    });
    let body = Full::new(Bytes::from(name)).map_err(|e: Infallible| match e {});
    let body = if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        body.with_trailers(async { Some(Ok(trailers)) }).boxed()
    } else {
        body.boxed()
    };
    Ok(Response::builder()
        .header("x-app", name)
        .body(body)
        .unwrap())
}

/// A port whose first connection is served by `serve` towards `original` and `local`; the
/// handle gives `serve`'s result.
async fn proxy(
    filter: HttpFilter,
    mode: IncomingMode,
    original: SocketAddr,
    local: SocketAddr,
    options: Options,
) -> (SocketAddr, JoinHandle<Result<(), Error>>) {
    let filter = Arc::new(Filter::compile(&filter).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        serve(
            client,
            filter,
            mode,
            move || TcpStream::connect(original),
            move || TcpStream::connect(local),
            options,
        )
        .await
    });
    (addr, served)
}

fn options() -> Options {
    Options {
        detect_timeout: SHORT_DETECT,
        ..Options::default()
    }
}

fn me() -> HttpFilter {
    HttpFilter::Header("^x-user: me$".into())
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

type ClientBody = Full<Bytes>;

async fn http1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<ClientBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection.with_upgrades());
    sender
}

async fn http2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<ClientBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

fn request(method: &str, uri: &str, user: Option<&str>, body: &'static str) -> Request<ClientBody> {
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "svc");
    if let Some(user) = user {
        builder = builder.header("X-User", user);
    }
    builder.body(Full::new(Bytes::from(body))).unwrap()
}

async fn text(response: Response<Incoming>) -> String {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Sends one request on a kept HTTP/1 connection and returns the body.
async fn ask(
    client: &mut hyper::client::conn::http1::SendRequest<ClientBody>,
    request: Request<ClientBody>,
) -> String {
    client.ready().await.unwrap();
    text(client.send_request(request).await.unwrap()).await
}

/// Waits for `check` to hold, as a mirrored copy arrives after the client's answer.
async fn eventually(mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn http1_keep_alive_routes_each_request_on_its_own() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let (addr, served) = proxy(
            me(),
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        let mut answers = Vec::new();
        for user in ["me", "you", "me", "you"] {
            answers.push(ask(&mut client, request("GET", "/", Some(user), "")).await);
        }
        assert_eq!(answers, ["local", "remote", "local", "remote"]);
        // One client connection, and one kept connection to each app.
        assert_eq!((original.accepted(), local.accepted()), (1, 1));
        assert_eq!(original.seen().len(), 2);
        assert_eq!(local.seen().len(), 2);
        drop(client);
        served.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn http1_request_reaches_the_app_as_sent() {
    within(async {
        // A raw socket as the original app, to see the bytes themselves: header case and order.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let original = listener.local_addr().unwrap();
        let app = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                stream.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nX-From-App: Yes\r\nContent-Length: 6\r\n\r\nremote")
                .await
                .unwrap();
            head
        });
        let (addr, _served) = proxy(
            me(),
            IncomingMode::Steal,
            original,
            closed_port().await,
            options(),
        )
        .await;
        let sent = "GET /a?b=c HTTP/1.1\r\nHost: svc\r\nX-Mixed-Case: One\r\nx-lower: two\r\n\r\n";
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(sent.as_bytes()).await.unwrap();
        assert_eq!(String::from_utf8(app.await.unwrap()).unwrap(), sent);
        let mut answer = vec![0; 1024];
        let n = client.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("X-From-App: Yes\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nremote"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn path_and_method_filters() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let path = HttpFilter::Path("^/api/".into());
        let (addr, _) = proxy(
            path,
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        assert_eq!(
            ask(&mut client, request("GET", "/api/users?x=1", None, "")).await,
            "local"
        );
        assert_eq!(
            ask(&mut client, request("GET", "/v1/api/", None, "")).await,
            "remote"
        );

        let method = HttpFilter::Method("^(post|delete)$".into());
        let (addr, _) = proxy(
            method,
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        assert_eq!(
            ask(&mut client, request("POST", "/", None, "data")).await,
            "local"
        );
        assert_eq!(
            ask(&mut client, request("GET", "/", None, "")).await,
            "remote"
        );
        assert_eq!(
            ask(&mut client, request("DELETE", "/", None, "")).await,
            "local"
        );
        assert_eq!(local.seen()[1].body, "data");
    })
    .await;
}

#[tokio::test]
async fn all_of_and_any_of() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let filter = HttpFilter::AllOf(vec![
            me(),
            HttpFilter::AnyOf(vec![
                HttpFilter::Path("^/api".into()),
                HttpFilter::Method("^post$".into()),
            ]),
        ]);
        let (addr, _) = proxy(
            filter,
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        let cases = [
            ("GET", "/api", Some("me"), "local"),
            ("POST", "/x", Some("me"), "local"),
            ("GET", "/x", Some("me"), "remote"),
            ("POST", "/api", Some("you"), "remote"),
            ("POST", "/api", None, "remote"),
        ];
        for (method, path, user, expected) in cases {
            let answer = ask(&mut client, request(method, path, user, "")).await;
            assert_eq!(answer, expected, "{method} {path} {user:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn h2c_routes_each_stream_on_its_own() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V2).await,
            App::start("local", Http::V2).await,
        );
        let (addr, _) = proxy(
            me(),
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let client = http2_client(addr).await;
        let (mut first, mut second) = (client.clone(), client.clone());
        let (mine, theirs) = tokio::join!(
            first.send_request(request("GET", "http://svc/a", Some("me"), "")),
            second.send_request(request("GET", "http://svc/b", Some("you"), "")),
        );
        let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
        assert_eq!(mine.version(), http::Version::HTTP_2);
        assert_eq!(
            (text(mine).await, text(theirs).await),
            ("local".into(), "remote".into())
        );
        assert_eq!(local.seen()[0].path, "/a");
        assert_eq!(local.seen()[0].version, http::Version::HTTP_2);
        assert_eq!(original.seen()[0].path, "/b");
        assert_eq!((original.accepted(), local.accepted()), (1, 1));
    })
    .await;
}

#[tokio::test]
async fn grpc_trailers_survive() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V2).await,
            App::start("local", Http::V2).await,
        );
        let (addr, _) = proxy(
            me(),
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = http2_client(addr).await;
        for (user, app) in [("me", "local"), ("you", "remote")] {
            let mut call = request(
                "POST",
                "http://svc/pkg.Greeter/SayHello",
                Some(user),
                "\0\0\0\0\x02hi",
            );
            let headers = call.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
            let response = client.send_request(call).await.unwrap();
            let collected = response.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(collected.to_bytes(), app);
        }
        assert_eq!(local.seen()[0].body, "\0\0\0\0\x02hi");
    })
    .await;
}

#[tokio::test]
async fn websocket_upgrade_follows_the_matching_request() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let (addr, _) = proxy(
            me(),
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        // An ordinary request first: the upgrade happens on a kept connection.
        assert_eq!(
            ask(&mut client, request("GET", "/", Some("you"), "")).await,
            "remote"
        );
        let mut upgrade = request("GET", "/ws", Some("me"), "");
        upgrade
            .headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        upgrade
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        client.ready().await.unwrap();
        let response = client.send_request(upgrade).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["x-app"], "local");
        let mut upgraded = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
        let mut greeting = [0; 6];
        upgraded.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"local:");
        for message in [&b"ping"[..], b"\x81\x05hello"] {
            upgraded.write_all(message).await.unwrap();
            let mut echoed = vec![0; message.len()];
            upgraded.read_exact(&mut echoed).await.unwrap();
            assert_eq!(echoed, message);
        }
        assert_eq!(original.accepted(), 1);
    })
    .await;
}

/// A raw TCP app that writes `greeting` first (if any), then echoes.
async fn raw_echo(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut read, mut write) = stream.into_split();
        write.write_all(greeting).await.unwrap();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    });
    addr
}

#[tokio::test]
async fn raw_tcp_goes_to_the_original() {
    within(async {
        let local = App::start("local", Http::V1).await;
        let original = raw_echo(b"").await;
        let (addr, served) =
            proxy(me(), IncomingMode::Steal, original, local.addr, options()).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let sent = b"\x16\x03\x01\x00\x05hello, not HTTP";
        client.write_all(sent).await.unwrap();
        let mut echoed = vec![0; sent.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, sent);
        client.shutdown().await.unwrap();
        assert_eq!(client.read(&mut [0; 16]).await.unwrap(), 0);
        served.await.unwrap().unwrap();
        assert_eq!(local.accepted(), 0);
    })
    .await;
}

#[tokio::test]
async fn silent_client_goes_raw_to_the_original_after_the_timeout() {
    within(async {
        let local = App::start("local", Http::V1).await;
        // A server-speaks-first protocol (SMTP): its client waits for the greeting.
        let original = raw_echo(b"220 ready\r\n").await;
        let (addr, _) = proxy(me(), IncomingMode::Steal, original, local.addr, options()).await;
        let start = Instant::now();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0; 11];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"220 ready\r\n");
        assert!(start.elapsed() >= SHORT_DETECT, "{:?}", start.elapsed());
        client.write_all(b"EHLO me\r\n").await.unwrap();
        let mut echoed = [0; 9];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"EHLO me\r\n");
        assert_eq!(local.accepted(), 0);
    })
    .await;
}

#[tokio::test]
async fn mirror_answers_from_the_original_and_copies_to_local() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let (addr, _) = proxy(
            me(),
            IncomingMode::Mirror,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        assert_eq!(
            ask(
                &mut client,
                request("POST", "/orders", Some("me"), "payload")
            )
            .await,
            "remote"
        );
        assert_eq!(
            ask(&mut client, request("GET", "/other", Some("you"), "")).await,
            "remote"
        );
        assert_eq!(
            ask(&mut client, request("GET", "/mine", Some("me"), "")).await,
            "remote"
        );
        eventually(|| local.seen().len() == 2).await;
        let copies = local.seen();
        assert_eq!(
            (copies[0].method.as_str(), copies[0].path.as_str()),
            ("POST", "/orders")
        );
        assert_eq!(copies[0].body, "payload");
        assert_eq!(copies[1].path, "/mine");
        assert_eq!(original.seen().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn mirror_with_local_down_still_answers() {
    within(async {
        let original = App::start("remote", Http::V1).await;
        let (addr, _) = proxy(
            me(),
            IncomingMode::Mirror,
            original.addr,
            closed_port().await,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        for _ in 0..3 {
            assert_eq!(
                ask(&mut client, request("GET", "/", Some("me"), "")).await,
                "remote"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn steal_with_local_down_is_502_with_a_reason() {
    within(async {
        let original = App::start("remote", Http::V1).await;
        let (addr, _) = proxy(
            me(),
            IncomingMode::Steal,
            original.addr,
            closed_port().await,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        client.ready().await.unwrap();
        let response = client
            .send_request(request("GET", "/", Some("me"), ""))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let reason = text(response).await;
        assert!(
            reason.starts_with("mirrord: cannot connect to the local app: "),
            "{reason}"
        );
        assert!(reason.contains("refused"), "{reason}");
        assert_eq!(reason.trim_end().lines().count(), 1, "{reason}");
        // The connection goes on for the requests the original app answers.
        assert_eq!(
            ask(&mut client, request("GET", "/", Some("you"), "")).await,
            "remote"
        );
    })
    .await;
}

#[tokio::test]
async fn garbage_after_an_http_request_line_gets_400() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let (addr, served) = proxy(
            me(),
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: svc\r\nthis is no header\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        let error = served.await.unwrap().unwrap_err();
        assert!(!error.to_string().contains('\n'), "{error}");
        assert_eq!((original.accepted(), local.accepted()), (0, 0));
    })
    .await;
}

/// A raw HTTP/1 app that answers one request per connection with a keep-alive response and
/// then closes the connection, as an app with a short idle timeout does.
async fn one_request_per_connection(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                if stream.read_exact(&mut byte).await.is_err() {
                    break;
                }
                head.push(byte[0]);
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                name.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn an_app_closing_its_kept_connection_gets_a_new_one() {
    within(async {
        let (original, accepted) = one_request_per_connection("remote").await;
        let (addr, _) = proxy(
            me(),
            IncomingMode::Steal,
            original,
            closed_port().await,
            options(),
        )
        .await;
        let mut client = http1_client(addr).await;
        for round in 1..=3 {
            assert_eq!(
                ask(&mut client, request("GET", "/", None, "")).await,
                "remote"
            );
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    })
    .await;
}

#[tokio::test]
async fn mirror_with_a_stalled_local_app_answers_at_once() {
    within(async {
        let original = App::start("remote", Http::V1).await;
        // Accepts and never reads nor answers.
        let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = stalled.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let (_stream, _) = stalled.accept().await.unwrap();
            std::future::pending::<()>().await
        });
        let (addr, _) = proxy(me(), IncomingMode::Mirror, original.addr, local, options()).await;
        let mut client = http1_client(addr).await;
        let start = Instant::now();
        // More than the mirror queue holds: the extra copies are dropped, not waited for.
        for _ in 0..40 {
            let answer = ask(&mut client, request("POST", "/", Some("me"), "body")).await;
            assert_eq!(answer, "remote");
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(original.seen().len(), 40);
    })
    .await;
}

#[tokio::test]
async fn a_client_that_half_closes_still_gets_its_answer() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let (addr, _) = proxy(
            me(),
            IncomingMode::Steal,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: svc\r\nX-User: me\r\n\r\n")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nlocal"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn h2c_mirror_copies_matching_streams() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V2).await,
            App::start("local", Http::V2).await,
        );
        let (addr, _) = proxy(
            me(),
            IncomingMode::Mirror,
            original.addr,
            local.addr,
            options(),
        )
        .await;
        let client = http2_client(addr).await;
        let (mut first, mut second) = (client.clone(), client.clone());
        let (mine, theirs) = tokio::join!(
            first.send_request(request("PUT", "http://svc/mine", Some("me"), "copied")),
            second.send_request(request("GET", "http://svc/theirs", Some("you"), "")),
        );
        assert_eq!(text(mine.unwrap()).await, "remote");
        assert_eq!(text(theirs.unwrap()).await, "remote");
        eventually(|| local.seen().len() == 1).await;
        let copy = &local.seen()[0];
        assert_eq!(
            (copy.path.as_str(), copy.body.as_ref()),
            ("/mine", &b"copied"[..])
        );
        assert_eq!(original.seen().len(), 2);
    })
    .await;
}

#[tokio::test]
async fn mirror_skips_bodies_over_the_limit() {
    within(async {
        let (original, local) = (
            App::start("remote", Http::V1).await,
            App::start("local", Http::V1).await,
        );
        let options = Options {
            mirror_body_limit: 4,
            ..options()
        };
        let (addr, _) = proxy(
            me(),
            IncomingMode::Mirror,
            original.addr,
            local.addr,
            options,
        )
        .await;
        let mut client = http1_client(addr).await;
        for body in ["too long", "fits"] {
            assert_eq!(
                ask(&mut client, request("POST", "/", Some("me"), body)).await,
                "remote"
            );
        }
        eventually(|| !local.seen().is_empty()).await;
        // Copies go out in order, one at a time: a copy of the first would have come first.
        assert_eq!(local.seen()[0].body, "fits");
        assert_eq!(original.seen()[0].body, "too long");
    })
    .await;
}

/// Two sessions' filters on one client connection: each session's requests reach its own
/// local app, a third session mirroring everything gets a copy of each, and the rest go to the
/// original app.
#[tokio::test]
async fn several_sessions_filters_share_one_connection() {
    within(async {
        let original = App::start("remote", Http::V1).await;
        let alice = App::start("alice", Http::V1).await;
        let bob = App::start("bob", Http::V1).await;
        let watcher = App::start("watcher", Http::V1).await;
        let route = |user: &str, mode, app: SocketAddr| {
            let filter = HttpFilter::Header(format!("^x-user: {user}$"));
            LocalRoute::new(
                Arc::new(Filter::compile(&filter).unwrap()),
                mode,
                move || TcpStream::connect(app),
            )
        };
        let routes = vec![
            route("alice", IncomingMode::Steal, alice.addr),
            route("bob", IncomingMode::Steal, bob.addr),
            route(".*", IncomingMode::Mirror, watcher.addr),
        ];
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let original_addr = original.addr;
        let served = tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            serve_routes(
                client,
                routes,
                move || TcpStream::connect(original_addr),
                options(),
            )
            .await
        });
        let mut client = http1_client(addr).await;
        let mut answers = Vec::new();
        for user in ["alice", "bob", "carol", "bob", "alice"] {
            answers.push(ask(&mut client, request("GET", "/", Some(user), "")).await);
        }
        assert_eq!(answers, ["alice", "bob", "remote", "bob", "alice"]);
        assert_eq!(
            (alice.seen().len(), bob.seen().len(), original.seen().len()),
            (2, 2, 1)
        );
        eventually(|| watcher.seen().len() == 5).await;
        drop(client);
        served.await.unwrap().unwrap();
    })
    .await;
}
