//! What a client connection speaks, from its first bytes: the HTTP/2 connection preface, an
//! HTTP/1.x request line, or anything else. [`classify`] is pure and never decides before it
//! has seen enough; [`read_head`] feeds it from the socket within a deadline. Whatever was read
//! is handed on, so nothing the client sent is ever lost to detection.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What the client's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or 1.1: served request by request.
    Http1,
    /// HTTP/2 with prior knowledge (h2c): served stream by stream.
    Http2,
    /// Not HTTP, or nothing said in time: piped to the original app untouched.
    Raw,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A request line longer than this is taken for something that is not HTTP. hyper refuses a
/// request head beyond a few hundred KiB anyway; real request lines stay far below 8 KiB, the
/// limit common servers (nginx, Node) set for a whole line.
pub const MAX_REQUEST_LINE: usize = 8192;

/// Decides from the bytes read so far, or `None` while they could still become either.
pub fn classify(head: &[u8]) -> Option<Protocol> {
    if head.starts_with(PREFACE) {
        return Some(Protocol::Http2);
    }
    if PREFACE.starts_with(head) {
        // Including the empty head: nothing has been said yet.
        return None;
    }
    let decided = request_line(head);
    if decided.is_none() && head.len() > MAX_REQUEST_LINE {
        return Some(Protocol::Raw);
    }
    decided
}

/// `method SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3), a bare LF accepted as hyper
/// accepts it.
fn request_line(head: &[u8]) -> Option<Protocol> {
    let method_len = head.iter().take_while(|b| is_tchar(**b)).count();
    // Each `?` below: the line has not got that far yet, so it is undecided.
    let &after_method = head.get(method_len)?;
    if method_len == 0 || after_method != b' ' {
        return Some(Protocol::Raw);
    }
    let target = &head[method_len + 1..];
    let target_len = target.iter().take_while(|b| is_target_byte(**b)).count();
    let &after_target = target.get(target_len)?;
    if target_len == 0 || after_target != b' ' {
        return Some(Protocol::Raw);
    }
    let version = &target[target_len + 1..];
    const VERSIONS: [&[u8]; 4] = [
        b"HTTP/1.1\r\n",
        b"HTTP/1.0\r\n",
        b"HTTP/1.1\n",
        b"HTTP/1.0\n",
    ];
    if VERSIONS.iter().any(|v| version.starts_with(v)) {
        Some(Protocol::Http1)
    } else if VERSIONS.iter().any(|v| v.starts_with(version)) {
        None
    } else {
        Some(Protocol::Raw)
    }
}

/// A method is a token (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Anything visible: which targets are valid is hyper's to say (with a 400), not detection's.
fn is_target_byte(b: u8) -> bool {
    b > b' ' && b != 0x7f
}

/// Reads from `client` until [`classify`] decides, the client stops sending (end of stream) or
/// `timeout` has passed since the call; the last two mean [`Protocol::Raw`]. Returns every byte
/// read, for whoever serves the connection next.
pub async fn read_head<C>(client: &mut C, timeout: Duration) -> io::Result<(Protocol, Vec<u8>)>
where
    C: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut head = Vec::with_capacity(1024);
    loop {
        if let Some(protocol) = classify(&head) {
            return Ok((protocol, head));
        }
        head.reserve(1024);
        match tokio::time::timeout_at(deadline, client.read_buf(&mut head)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Raw, head)),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_yet_is_undecided() {
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn the_preface_is_http2_and_its_prefixes_wait() {
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        let mut more = PREFACE.to_vec();
        more.extend_from_slice(b"\x00\x00\x12\x04");
        assert_eq!(classify(&more), Some(Protocol::Http2));
        for len in 1..PREFACE.len() {
            assert_eq!(classify(&PREFACE[..len]), None, "{len} bytes");
        }
    }

    #[test]
    fn a_request_line_is_http1() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"POST /a?b=c HTTP/1.0\r\nHost: x\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"CONNECT svc:443 HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
    }

    #[test]
    fn a_partial_request_line_waits() {
        let line = b"GET /index.html HTTP/1.1\r\n";
        for len in 0..line.len() {
            assert_eq!(classify(&line[..len]), None, "{:?}", &line[..len]);
        }
    }

    #[test]
    fn other_bytes_are_raw_as_soon_as_they_cannot_be_http() {
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Raw)); // TLS
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6"), None); // a token so far
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n"), Some(Protocol::Raw));
        assert_eq!(classify(b" GET"), Some(Protocol::Raw));
        assert_eq!(classify(b"GET  /"), Some(Protocol::Raw));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Raw));
        assert_eq!(classify(b"GET / FTP"), Some(Protocol::Raw));
        assert_eq!(classify(b"GET /\x01 HTTP/1.1"), Some(Protocol::Raw));
        // Redis inline commands look like a method and a target, not a version.
        assert_eq!(classify(b"PING x y\r\n"), Some(Protocol::Raw));
        // Starts like the preface, then is not.
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\nX"), Some(Protocol::Raw));
    }

    #[test]
    fn an_endless_request_line_is_raw() {
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST_LINE, b'a');
        assert_eq!(classify(&line), None);
        line.push(b'a');
        assert_eq!(classify(&line), Some(Protocol::Raw));
    }

    #[tokio::test]
    async fn read_head_returns_every_byte_read() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(b"GET / HT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client
                .write_all(b"TP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            // Keep the stream open: an end of stream would be a decision of its own.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (protocol, head) = read_head(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Http1);
        assert!(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".starts_with(&head));
        assert!(head.len() >= b"GET / HTTP/1.1\r\n".len());
    }

    #[tokio::test]
    async fn silence_and_end_of_stream_are_raw() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (protocol, head) = read_head(&mut server, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!((protocol, head.as_slice()), (Protocol::Raw, &b""[..]));

        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let (protocol, _) = read_head(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Raw);
    }
}
