//! A redirected connection's original destination, as conntrack remembers it
//! (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`). The kernel's bytes are parsed by a pure function
//! that never panics; a connection whose destination cannot be read is never guessed at.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the number 80.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of the accepted connection `socket`, whose peer is `peer`: an
/// IPv4 client (plain or v4-mapped on a dual-stack listener) is asked at the IPv4 level.
pub fn original_destination(socket: BorrowedFd<'_>, peer: SocketAddr) -> io::Result<SocketAddr> {
    let ipv4 = match peer {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let (level, size) = if ipv4 {
        (libc::SOL_IP, size_of::<libc::sockaddr_in>())
    } else {
        (libc::SOL_IPV6, size_of::<libc::sockaddr_in6>())
    };
    let mut buf = [0u8; size_of::<libc::sockaddr_in6>()];
    let mut len = size as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes (no more than its size), the kernel writes at most
    // `len` bytes and updates `len`; the fd is borrowed, so open for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..(len as usize).min(buf.len())]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel's original destination is not an IPv4 or IPv6 address",
        )
    })
}

/// A `sockaddr_in` or `sockaddr_in6` as the kernel lays it out (family in host order, port and
/// address in network order).
pub fn parse(bytes: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(bytes.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some(SocketAddrV4::new(Ipv4Addr::from(ip), port).into())
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(bytes.get(24..28)?.try_into().ok()?);
            Some(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, scope).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut bytes = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        bytes.extend(port.to_be_bytes());
        bytes.extend(ip);
        bytes.extend([0u8; 8]);
        bytes
    }

    #[test]
    fn ipv4_and_ipv6_destinations_are_read() {
        assert_eq!(
            parse(&sockaddr_in([10, 0, 0, 2], 8080)),
            Some("10.0.0.2:8080".parse().unwrap())
        );
        let mut v6 = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v6.extend(443u16.to_be_bytes());
        v6.extend([0u8; 4]); // flow info
        v6.extend("fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend(0u32.to_ne_bytes());
        assert_eq!(parse(&v6), Some("[fd00::2]:443".parse().unwrap()));
    }

    #[test]
    fn short_or_foreign_addresses_are_refused() {
        let whole = sockaddr_in([10, 0, 0, 2], 80);
        for cut in 0..8 {
            assert_eq!(parse(&whole[..cut]), None, "{cut} bytes");
        }
        let mut unix = whole.clone();
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse(&unix), None);
        let mut v6 = whole;
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        assert_eq!(parse(&v6), None, "a sockaddr_in6 is 28 bytes");
    }
}
