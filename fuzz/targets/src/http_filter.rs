//! The HTTP filter's handling of a redirected client connection: the input is everything the
//! client sends (then it closes its side), detected as HTTP/1, h2c or raw TCP and routed by a
//! filter to the local or the original app, each a small HTTP server (HTTP/1 or HTTP/2, as it
//! is spoken to) answering every request. The first input byte picks steal or mirror. Time is
//! paused, so detection and every timeout pass at once, and nothing touches a socket.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mirrord_http_filter::{Filter, HttpFilter, IncomingMode, Options, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The HTTP/2 connection preface's first bytes.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

pub fn run(data: &[u8]) {
    let Some((&mode, client_bytes)) = data.split_first() else {
        return;
    };
    let mode = if mode & 1 == 0 {
        IncomingMode::Steal
    } else {
        IncomingMode::Mirror
    };
    let filter = HttpFilter::AnyOf(vec![
        HttpFilter::Header("^x-user: me$".into()),
        HttpFilter::AllOf(vec![
            HttpFilter::Path("^/api/".into()),
            HttpFilter::Method("POST".into()),
        ]),
    ]);
    // A filter that does not compile would be refused at subscription.
    let Ok(filter) = Filter::compile(&filter) else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
    else {
        return;
    };
    let client_bytes = client_bytes.to_vec();
    runtime.block_on(async move {
        let (mut client, agent_side) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve(
            agent_side,
            Arc::new(filter),
            mode,
            || async { Ok(app("original")) },
            || async { Ok(app("local")) },
            Options {
                detect_timeout: Duration::from_millis(100),
                ..Options::default()
            },
        ));
        let talk = async {
            // The client may stop reading or close at any point: a write that fails ends it.
            let (mut read, mut write) = tokio::io::split(&mut client);
            let send = async {
                let _ = write.write_all(&client_bytes).await;
                let _ = write.shutdown().await;
            };
            let mut answer = Vec::new();
            let receive = read.read_to_end(&mut answer);
            let _ = tokio::join!(send, receive);
        };
        // Paused time runs ahead whenever every task waits: a connection that does not end
        // on its own ends here, at once in real time.
        let _ = tokio::time::timeout(Duration::from_secs(60), talk).await;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(60), served).await;
    });
}

/// An app: one end of a connection served by an HTTP server of the version spoken to it,
/// answering `name` to every request.
fn app(name: &'static str) -> DuplexStream {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut read, write) = tokio::io::split(theirs);
        let mut first = vec![0u8; H2_PREFACE.len()];
        let mut got = 0;
        while got < first.len() {
            match read.read(&mut first[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        first.truncate(got);
        let h2 = first == H2_PREFACE;
        let io = TokioIo::new(tokio::io::join(
            std::io::Cursor::new(first).chain(read),
            write,
        ));
        let service = service_fn(move |_request| async move {
            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                name.as_bytes(),
            ))))
        });
        if h2 {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        } else {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .with_upgrades()
                .await;
        }
    });
    ours
}
