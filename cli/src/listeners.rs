//! Which TCP ports the launched process listens on, read from the kernel with netlink
//! `sock_diag` on a socket created inside the process's own network namespace (every listening
//! socket there is the process tree's own). It only reads; it never decides what to subscribe.
//!
//! The request and reply layouts are those of `linux/inet_diag.h`; the parser takes the reply
//! bytes as untrusted input and never panics on them. [`DiagSocket`] is the thin I/O shell.
//!
//! `sock_diag` has no notification for a socket entering LISTEN (its multicast groups report
//! destroyed sockets only, and need CAP_NET_ADMIN), and tracing `listen(2)` would need eBPF or
//! ptrace, i.e. root and a process this tool does not own. So the namespace is dumped
//! periodically: a dump of a namespace with a handful of sockets costs microseconds.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// `SOCK_DIAG_BY_FAMILY` of linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCP_LISTEN` of the kernel's TCP states (include/net/tcp_states.h).
const TCP_LISTEN: u32 = 10;
const NLMSG_HEADER_LEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQUEST_LEN: usize = 56;
/// `struct inet_diag_msg` up to and including `idiag_inode`.
const DIAG_MSG_LEN: usize = 72;
/// How long one dump may take before the socket is considered stuck.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiagError {
    #[error("malformed sock_diag reply")]
    Malformed,
    #[error("sock_diag refused the dump: {0}")]
    Refused(i32),
}

/// The dump request for one address family's listening TCP sockets (`nlmsghdr` followed by
/// `inet_diag_req_v2`).
pub fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    let len = (NLMSG_HEADER_LEN + REQUEST_LEN) as u32;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // sdiag_family, sdiag_protocol, idiag_ext, pad
    msg.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    msg.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // inet_diag_sockid: all zero matches every socket.
    msg.resize(len as usize, 0);
    msg
}

/// What one receive of a dump held: the listening addresses, and whether the dump is done.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DumpPart {
    pub listeners: Vec<SocketAddr>,
    pub done: bool,
}

fn u16_ne(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_ne(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the netlink messages of one receive (several per datagram) of a dump answered to
/// `seq`; messages of other sequence numbers are skipped.
pub fn parse_dump(bytes: &[u8], seq: u32) -> Result<DumpPart, DiagError> {
    let mut part = DumpPart::default();
    let mut at = 0;
    while at + NLMSG_HEADER_LEN <= bytes.len() {
        let len = u32_ne(bytes, at).ok_or(DiagError::Malformed)? as usize;
        let kind = u16_ne(bytes, at + 4).ok_or(DiagError::Malformed)?;
        let msg_seq = u32_ne(bytes, at + 8).ok_or(DiagError::Malformed)?;
        if len < NLMSG_HEADER_LEN || at + len > bytes.len() {
            return Err(DiagError::Malformed);
        }
        let body = &bytes[at + NLMSG_HEADER_LEN..at + len];
        // NLMSG_ALIGN: every message starts on a 4-byte boundary.
        at += (len + 3) & !3;
        if msg_seq != seq {
            continue;
        }
        match kind {
            k if k == libc::NLMSG_DONE as u16 => part.done = true,
            k if k == libc::NLMSG_ERROR as u16 => {
                let errno = u32_ne(body, 0).ok_or(DiagError::Malformed)? as i32;
                if errno != 0 {
                    return Err(DiagError::Refused(-errno));
                }
            }
            SOCK_DIAG_BY_FAMILY => part.listeners.push(listener(body)?),
            _ => {}
        }
    }
    Ok(part)
}

/// The local address of one `inet_diag_msg`.
fn listener(msg: &[u8]) -> Result<SocketAddr, DiagError> {
    if msg.len() < DIAG_MSG_LEN {
        return Err(DiagError::Malformed);
    }
    // id.idiag_sport is in network byte order, id.idiag_src starts at offset 8.
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let src = &msg[8..24];
    let ip = match i32::from(msg[0]) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        libc::AF_INET6 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(src);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(DiagError::Malformed),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Whether redirected traffic can reach a socket listening on `addr`: a socket bound to
/// loopback only (127.0.0.0/8, ::1, or their IPv4-mapped forms) cannot, since connections are
/// delivered to the process's own (pod) address through the TUN.
pub fn reachable(addr: SocketAddr) -> bool {
    !addr.ip().to_canonical().is_loopback()
}

/// A `NETLINK_SOCK_DIAG` socket, answering for the namespace it was created in.
pub struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
}

impl DiagSocket {
    /// Takes a socket created with `socket(AF_NETLINK, SOCK_RAW, NETLINK_SOCK_DIAG)`; receives
    /// time out after [`RECV_TIMEOUT`] so a stuck dump never blocks forever.
    pub fn new(fd: OwnedFd) -> io::Result<DiagSocket> {
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt(2) reads one timeval from this frame, its size passed along.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DiagSocket { fd, seq: 0 })
    }

    /// Creates a socket in the calling thread's current network namespace.
    #[cfg(test)]
    pub fn open_here() -> io::Result<DiagSocket> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nothing else.
        DiagSocket::new(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Every listening TCP socket's local address, IPv4 and IPv6. Blocking (two short dumps).
    pub fn listening(&mut self) -> io::Result<BTreeSet<SocketAddr>> {
        let mut all = BTreeSet::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            self.seq = self.seq.wrapping_add(1);
            all.extend(self.dump(family, self.seq)?);
        }
        Ok(all)
    }

    fn dump(&self, family: u8, seq: u32) -> io::Result<Vec<SocketAddr>> {
        let request = dump_request(family, seq);
        // SAFETY: send(2) reads `request.len()` bytes from the request buffer. An unbound
        // netlink socket sends to the kernel (port 0) by default.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut listeners = Vec::new();
        // The kernel fills dump datagrams up to about 32 KiB.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let part = match parse_dump(&buf[..n as usize], seq) {
                Ok(part) => part,
                // A kernel without IPv6 has no AF_INET6 handler: nothing listens there.
                Err(DiagError::Refused(libc::ENOENT)) => return Ok(listeners),
                Err(DiagError::Refused(errno)) => return Err(io::Error::from_raw_os_error(errno)),
                Err(error) => return Err(io::Error::other(error)),
            };
            listeners.extend(part.listeners);
            if part.done || n == 0 {
                return Ok(listeners);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize, kind: u16, seq: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&(len as u32).to_ne_bytes());
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(&2u16.to_ne_bytes());
        h.extend_from_slice(&seq.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        h
    }

    fn diag_msg(family: i32, src: &[u8], port: u16, seq: u32) -> Vec<u8> {
        let mut body = vec![family as u8, TCP_LISTEN as u8, 0, 0];
        body.extend_from_slice(&port.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        let mut addr = [0u8; 16];
        addr[..src.len()].copy_from_slice(src);
        body.extend_from_slice(&addr);
        body.resize(DIAG_MSG_LEN + 8, 0); // plus an attribute the parser skips
        let mut msg = header(NLMSG_HEADER_LEN + body.len(), SOCK_DIAG_BY_FAMILY, seq);
        msg.extend(body);
        msg
    }

    #[test]
    fn the_request_asks_for_listening_tcp_sockets_of_one_family() {
        let req = dump_request(libc::AF_INET6 as u8, 7);
        assert_eq!(req.len(), 72);
        assert_eq!(u32_ne(&req, 0), Some(72));
        assert_eq!(u16_ne(&req, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u32_ne(&req, 8), Some(7));
        assert_eq!(
            &req[16..18],
            &[libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8]
        );
        assert_eq!(u32_ne(&req, 20), Some(1 << 10));
    }

    #[test]
    fn a_dump_yields_each_listeners_address_until_done() {
        let mut bytes = diag_msg(libc::AF_INET, &[0, 0, 0, 0], 8080, 3);
        bytes.extend(diag_msg(
            libc::AF_INET6,
            &Ipv6Addr::LOCALHOST.octets(),
            9090,
            3,
        ));
        bytes.extend(diag_msg(libc::AF_INET, &[10, 0, 0, 2], 1, 99)); // another dump's
        let part = parse_dump(&bytes, 3).unwrap();
        assert_eq!(
            part.listeners,
            vec![
                "0.0.0.0:8080".parse().unwrap(),
                "[::1]:9090".parse().unwrap()
            ]
        );
        assert!(!part.done);
        let mut done = header(NLMSG_HEADER_LEN + 4, libc::NLMSG_DONE as u16, 3);
        done.extend_from_slice(&0i32.to_ne_bytes());
        assert_eq!(
            parse_dump(&done, 3),
            Ok(DumpPart {
                listeners: vec![],
                done: true
            })
        );
    }

    #[test]
    fn errors_and_truncation_are_values() {
        let mut error = header(NLMSG_HEADER_LEN + 4, libc::NLMSG_ERROR as u16, 1);
        error.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse_dump(&error, 1), Err(DiagError::Refused(libc::EPERM)));
        let whole = diag_msg(libc::AF_INET, &[0; 4], 80, 1);
        for cut in [17, 40, whole.len() - 1] {
            assert_eq!(
                parse_dump(&whole[..cut], 1),
                Err(DiagError::Malformed),
                "cut at {cut}"
            );
        }
        let mut short = header(NLMSG_HEADER_LEN + 8, SOCK_DIAG_BY_FAMILY, 1);
        short.extend_from_slice(&[2, 10, 0, 0, 0, 80, 0, 0]);
        assert_eq!(parse_dump(&short, 1), Err(DiagError::Malformed));
        assert_eq!(parse_dump(&[1, 2, 3], 1), Ok(DumpPart::default()));
    }

    #[test]
    fn loopback_listeners_are_unreachable() {
        for addr in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(!reachable(addr.parse().unwrap()), "{addr}");
        }
        for addr in ["0.0.0.0:80", "[::]:80", "10.0.0.2:80", "[fd00::2]:80"] {
            assert!(reachable(addr.parse().unwrap()), "{addr}");
        }
    }

    /// A real dump, in a network namespace of a thread of this test's own (never the machine's
    /// namespace, whose sockets are not ours to look at): listeners appear and disappear.
    #[test]
    fn a_real_dump_follows_listeners_in_a_private_namespace() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to create a network namespace");
            return;
        }
        let found = std::thread::spawn(|| {
            // SAFETY: unshare(2) moves only this thread into a new network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let mut diag = DiagSocket::open_here().unwrap();
            assert!(
                diag.listening().unwrap().is_empty(),
                "a new namespace is empty"
            );
            // lo is down in a new namespace; binding to the wildcard needs no interface.
            let v4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            let v6 = std::net::TcpListener::bind("[::]:0").unwrap();
            let connected = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let seen = diag.listening().unwrap();
            let expected: BTreeSet<SocketAddr> =
                [v4.local_addr().unwrap(), v6.local_addr().unwrap()].into();
            drop((v4, v6, connected));
            let after = diag.listening().unwrap();
            (seen, expected, after)
        })
        .join()
        .unwrap();
        let (seen, expected, after) = found;
        assert_eq!(seen, expected, "UDP sockets are not listeners");
        assert!(after.is_empty(), "closed listeners are gone: {after:?}");
    }
}
