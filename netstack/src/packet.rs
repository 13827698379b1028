//! Classifies raw IP packets from the app and builds the few packets the stack writes itself
//! (RST, ICMP unreachable, UDP replies); it never keeps state and never panics on bad input.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr, checksum,
};

/// A flow as the app sees it: (app's own address, the destination it asked for).
pub(crate) type FlowKey = (SocketAddr, SocketAddr);

const HOP_LIMIT: u8 = 64;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
/// RFC 4443: an ICMPv6 error carries as much of the offending packet as fits in 1280 bytes.
const IPV6_MIN_MTU: usize = 1280;

/// What an inbound packet is, as far as the stack's own bookkeeping cares.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A connection-opening SYN (no ACK): the caller decides before smoltcp sees it.
    /// `seq` is the app's initial sequence number.
    TcpSyn { key: FlowKey, seq: u32 },
    /// Any other TCP segment: smoltcp handles it (or answers with RST when it has no socket).
    Tcp(TcpSegment),
    /// A UDP datagram; the payload is `packet[payload]`.
    Udp {
        key: FlowKey,
        payload: std::ops::Range<usize>,
    },
    /// Anything else (ICMP, unknown protocols): smoltcp gets to see it.
    Other,
}

/// Where a TCP segment from the app lies in its byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpSegment {
    pub(crate) key: FlowKey,
    /// The sequence number of its first byte of payload.
    pub(crate) seq: u32,
    /// Bytes of payload.
    pub(crate) len: u32,
    /// It carries a SYN (the app's SYN-ACK to a connection the stack originated).
    pub(crate) syn: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum PacketError {
    #[error("malformed or unsupported IP packet")]
    Malformed,
    #[error("packet does not fit in a single IP datagram")]
    TooLarge,
}

fn ip_of(addr: IpAddress) -> IpAddr {
    match addr {
        IpAddress::Ipv4(a) => IpAddr::V4(a),
        IpAddress::Ipv6(a) => IpAddr::V6(a),
    }
}

/// Parses an IP header: (src, dst, protocol, byte range of the IP payload).
fn parse_ip(
    packet: &[u8],
    caps: &ChecksumCapabilities,
) -> Result<(IpAddress, IpAddress, IpProtocol, std::ops::Range<usize>), PacketError> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let p = Ipv4Packet::new_checked(packet).map_err(|_| PacketError::Malformed)?;
            let repr = Ipv4Repr::parse(&p, caps).map_err(|_| PacketError::Malformed)?;
            let start = usize::from(p.header_len());
            Ok((
                repr.src_addr.into(),
                repr.dst_addr.into(),
                repr.next_header,
                start..start + repr.payload_len,
            ))
        }
        Some(6) => {
            let p = Ipv6Packet::new_checked(packet).map_err(|_| PacketError::Malformed)?;
            let repr = Ipv6Repr::parse(&p).map_err(|_| PacketError::Malformed)?;
            Ok((
                repr.src_addr.into(),
                repr.dst_addr.into(),
                repr.next_header,
                IPV6_HEADER_LEN..IPV6_HEADER_LEN + repr.payload_len,
            ))
        }
        _ => Err(PacketError::Malformed),
    }
}

/// Validates a packet from the app and says what it is.
pub(crate) fn classify(packet: &[u8], caps: &ChecksumCapabilities) -> Result<Inbound, PacketError> {
    let (src, dst, proto, range) = parse_ip(packet, caps)?;
    let payload = packet.get(range.clone()).ok_or(PacketError::Malformed)?;
    match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(payload).map_err(|_| PacketError::Malformed)?;
            let repr =
                TcpRepr::parse(&tcp, &src, &dst, caps).map_err(|_| PacketError::Malformed)?;
            let key = (
                SocketAddr::new(ip_of(src), repr.src_port),
                SocketAddr::new(ip_of(dst), repr.dst_port),
            );
            // The wire's 32 bits, whatever sign smoltcp's type gives them.
            let seq = repr.seq_number.0 as u32;
            let syn = repr.control == TcpControl::Syn;
            if syn && repr.ack_number.is_none() {
                Ok(Inbound::TcpSyn { key, seq })
            } else {
                Ok(Inbound::Tcp(TcpSegment {
                    key,
                    // A SYN occupies the sequence number before the payload.
                    seq: seq.wrapping_add(u32::from(syn)),
                    len: repr.payload.len() as u32,
                    syn,
                }))
            }
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(payload).map_err(|_| PacketError::Malformed)?;
            let repr =
                UdpRepr::parse(&udp, &src, &dst, caps).map_err(|_| PacketError::Malformed)?;
            let key = (
                SocketAddr::new(ip_of(src), repr.src_port),
                SocketAddr::new(ip_of(dst), repr.dst_port),
            );
            // The UDP header is 8 bytes; its length field was validated by new_checked.
            let start = range.start + 8;
            let end = range.start + usize::from(udp.len());
            Ok(Inbound::Udp {
                key,
                payload: start..end,
            })
        }
        _ => Ok(Inbound::Other),
    }
}

/// Where a TCP packet's checksum starts being computed and where it goes, for a device that
/// completes it: the TCP header's offset in the packet, and the checksum's offset in it. The
/// checksum field gets the pseudo-header sum; `None` (and the packet untouched) for anything
/// but a TCP packet.
pub(crate) fn leave_tcp_checksum(packet: &mut [u8]) -> Option<(u16, u16)> {
    const CHECKSUM_AT: usize = 16;
    let (src, dst, proto, range) = parse_ip(packet, &ChecksumCapabilities::ignored()).ok()?;
    if proto != IpProtocol::Tcp {
        return None;
    }
    let len = u32::try_from(range.len()).ok()?;
    let pseudo = checksum::pseudo_header(&src, &dst, IpProtocol::Tcp, len);
    let at = range.start + CHECKSUM_AT;
    let field = packet.get_mut(at..at + 2)?;
    // The folded sum, not its complement: the device adds the segment to it and complements.
    field.copy_from_slice(&pseudo.to_be_bytes());
    Some((u16::try_from(range.start).ok()?, CHECKSUM_AT as u16))
}

/// Splits a TCP segment carrying both data and a FIN into a data-only segment and a bare FIN
/// right after it; `None` for any other packet (including ones it cannot parse).
///
/// smoltcp 0.14 trims a segment's data to its receive window but still accepts the FIN at the
/// segment's end, so bytes past a window edge that shrank (window scaling rounds the advertised
/// window down) would be silently lost behind an early EOF. Split, the trimmed FIN lands after
/// a gap, smoltcp ignores it, and the app retransmits the missing bytes with the FIN.
pub(crate) fn split_fin(packet: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (src, dst, proto, range) = parse_ip(packet, &ChecksumCapabilities::ignored()).ok()?;
    if proto != IpProtocol::Tcp || range.end != packet.len() {
        return None;
    }
    let tcp = TcpPacket::new_checked(packet.get(range.clone())?).ok()?;
    let header_len = usize::from(tcp.header_len());
    let payload_len = tcp.payload().len();
    if !tcp.fin() || tcp.syn() || tcp.rst() || payload_len == 0 {
        return None;
    }
    let fin_seq = tcp.seq_number() + payload_len;

    let mut data = packet.to_vec();
    let mut seg = TcpPacket::new_unchecked(data.get_mut(range.clone())?);
    seg.set_fin(false);
    seg.fill_checksum(&src, &dst);

    let fin_len = range.start + header_len;
    let mut fin = packet.get(..fin_len)?.to_vec();
    let ip_payload_len = u16::try_from(header_len).ok()?;
    match (src, dst) {
        (IpAddress::Ipv4(_), IpAddress::Ipv4(_)) => {
            let mut ip = Ipv4Packet::new_unchecked(&mut fin[..]);
            ip.set_total_len(u16::try_from(fin_len).ok()?);
            ip.fill_checksum();
        }
        _ => Ipv6Packet::new_unchecked(&mut fin[..]).set_payload_len(ip_payload_len),
    }
    let mut seg = TcpPacket::new_unchecked(fin.get_mut(range.start..)?);
    seg.set_seq_number(fin_seq);
    seg.fill_checksum(&src, &dst);
    Some((data, fin))
}

/// Writes an IP header for `payload_len` bytes of `proto` and lets `fill` write the payload.
fn emit_ip(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    payload_len: usize,
    caps: &ChecksumCapabilities,
    fill: impl FnOnce(&mut [u8]),
) -> Result<Vec<u8>, PacketError> {
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = IPV4_HEADER_LEN + payload_len;
            if total > usize::from(u16::MAX) {
                return Err(PacketError::TooLarge);
            }
            let mut buf = vec![0u8; total];
            let repr = Ipv4Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: proto,
                payload_len,
                hop_limit: HOP_LIMIT,
            };
            let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut p, caps);
            fill(p.payload_mut());
            Ok(buf)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            if payload_len > usize::from(u16::MAX) {
                return Err(PacketError::TooLarge);
            }
            let mut buf = vec![0u8; IPV6_HEADER_LEN + payload_len];
            let repr = Ipv6Repr {
                src_addr: src,
                dst_addr: dst,
                next_header: proto,
                payload_len,
                hop_limit: HOP_LIMIT,
            };
            let mut p = Ipv6Packet::new_unchecked(&mut buf[..]);
            repr.emit(&mut p);
            fill(p.payload_mut());
            Ok(buf)
        }
        // Flows never mix families: both ends of a key come from one IP header.
        _ => Err(PacketError::Malformed),
    }
}

/// Builds a TCP segment from `src` to `dst`.
pub(crate) fn build_tcp(
    src: SocketAddr,
    dst: SocketAddr,
    repr: &TcpRepr<'_>,
    caps: &ChecksumCapabilities,
) -> Result<Vec<u8>, PacketError> {
    let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    emit_ip(
        src.ip(),
        dst.ip(),
        IpProtocol::Tcp,
        repr.buffer_len(),
        caps,
        |buf| {
            let mut p = TcpPacket::new_unchecked(buf);
            repr.emit(&mut p, &s, &d, caps);
        },
    )
}

/// Builds a UDP datagram from `src` to `dst`.
pub(crate) fn build_udp(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    caps: &ChecksumCapabilities,
) -> Result<Vec<u8>, PacketError> {
    let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    let repr = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    emit_ip(
        src.ip(),
        dst.ip(),
        IpProtocol::Udp,
        8 + payload.len(),
        caps,
        |buf| {
            let mut p = UdpPacket::new_unchecked(buf);
            repr.emit(
                &mut p,
                &s,
                &d,
                payload.len(),
                |out| out.copy_from_slice(payload),
                caps,
            );
        },
    )
}

/// The RST|ACK a closed port answers a SYN with, so the app's connect fails with ECONNREFUSED.
pub(crate) fn refuse_syn(syn: &[u8], caps: &ChecksumCapabilities) -> Result<Vec<u8>, PacketError> {
    // The SYN was validated on the way in; checksums need no second look.
    let ignore = ChecksumCapabilities::ignored();
    let (src, dst, proto, range) = parse_ip(syn, &ignore)?;
    if proto != IpProtocol::Tcp {
        return Err(PacketError::Malformed);
    }
    let payload = syn.get(range).ok_or(PacketError::Malformed)?;
    let tcp = TcpPacket::new_checked(payload).map_err(|_| PacketError::Malformed)?;
    let repr = TcpRepr::parse(&tcp, &src, &dst, &ignore).map_err(|_| PacketError::Malformed)?;
    let rst = TcpRepr {
        src_port: repr.dst_port,
        dst_port: repr.src_port,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(repr.seq_number + repr.segment_len()),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    build_tcp(
        SocketAddr::new(ip_of(dst), repr.dst_port),
        SocketAddr::new(ip_of(src), repr.src_port),
        &rst,
        caps,
    )
}

/// An ICMP(v6) destination-unreachable about `offending`, sent from its destination, so the
/// app's connect/send fails with EHOSTUNREACH instead of waiting.
pub(crate) fn unreachable(
    offending: &[u8],
    caps: &ChecksumCapabilities,
) -> Result<Vec<u8>, PacketError> {
    let ignore = ChecksumCapabilities::ignored();
    match offending.first().map(|b| b >> 4) {
        Some(4) => {
            let p = Ipv4Packet::new_checked(offending).map_err(|_| PacketError::Malformed)?;
            let header = Ipv4Repr::parse(&p, &ignore).map_err(|_| PacketError::Malformed)?;
            // RFC 792: the offending IP header plus the first 8 bytes of its payload.
            let data = p.payload();
            let data = &data[..data.len().min(8)];
            let icmp = Icmpv4Repr::DstUnreachable {
                reason: Icmpv4DstUnreachable::HostUnreachable,
                header,
                data,
            };
            emit_ip(
                IpAddr::V4(header.dst_addr),
                IpAddr::V4(header.src_addr),
                IpProtocol::Icmp,
                icmp.buffer_len(),
                caps,
                |buf| icmp.emit(&mut Icmpv4Packet::new_unchecked(buf), caps),
            )
        }
        Some(6) => {
            let p = Ipv6Packet::new_checked(offending).map_err(|_| PacketError::Malformed)?;
            let header = Ipv6Repr::parse(&p).map_err(|_| PacketError::Malformed)?;
            // ICMPv6 header (8) + offending IPv6 header (40) + data must fit the minimum MTU.
            let room = IPV6_MIN_MTU - IPV6_HEADER_LEN - 8 - IPV6_HEADER_LEN;
            let data = p.payload();
            let data = &data[..data.len().min(room)];
            let icmp = Icmpv6Repr::DstUnreachable {
                reason: Icmpv6DstUnreachable::AddrUnreachable,
                header,
                data,
            };
            let (src, dst) = (header.dst_addr, header.src_addr);
            emit_ip(
                IpAddr::V6(src),
                IpAddr::V6(dst),
                IpProtocol::Icmpv6,
                icmp.buffer_len(),
                caps,
                |buf| icmp.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(buf), caps),
            )
        }
        _ => Err(PacketError::Malformed),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_left_tcp_checksum_completes_to_the_full_one() {
        for (src, dst) in [
            ("10.0.0.1:40000", "10.0.0.2:80"),
            ("[fd00::1]:40000", "[fd00::2]:80"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let payload = [7u8; 1001];
            let repr = TcpRepr {
                payload: &payload,
                control: TcpControl::Psh,
                ..syn_repr(40000, 80, 1)
            };
            let full = build_tcp(src, dst, &repr, &ChecksumCapabilities::default()).unwrap();
            let mut partial = full.clone();
            let (start, offset) = leave_tcp_checksum(&mut partial).expect("a TCP packet");
            let (start, at) = (usize::from(start), usize::from(start + offset));
            assert_eq!(start, if src.is_ipv4() { 20 } else { 40 });
            assert_ne!(partial[at..at + 2], full[at..at + 2]);
            // What the kernel does with a partial checksum: sum from `start` on, with the
            // pseudo-header sum in place, and store the complement.
            let completed = !checksum::data(&partial[start..]);
            assert_eq!(completed.to_be_bytes(), full[at..at + 2]);
        }
        let mut udp = build_udp(
            "10.0.0.1:53".parse().unwrap(),
            "10.0.0.2:5353".parse().unwrap(),
            b"x",
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        assert_eq!(
            leave_tcp_checksum(&mut udp),
            None,
            "only TCP is left to the device"
        );
    }

    pub(crate) fn syn_repr(src_port: u16, dst_port: u16, seq: i32) -> TcpRepr<'static> {
        TcpRepr {
            src_port,
            dst_port,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(seq),
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        }
    }

    pub(crate) fn syn(src: SocketAddr, dst: SocketAddr, seq: i32) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        build_tcp(src, dst, &syn_repr(src.port(), dst.port(), seq), &caps).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_syn_and_udp_with_their_addresses() {
        let caps = ChecksumCapabilities::default();
        let (a, b) = (addr("10.0.0.2:40000"), addr("10.1.2.3:80"));
        assert_eq!(
            classify(&syn(a, b, -2), &caps),
            Ok(Inbound::TcpSyn {
                key: (a, b),
                seq: u32::MAX - 1
            })
        );
        let (a6, b6) = (addr("[fd00::2]:5000"), addr("[fd00::5]:53"));
        let udp = build_udp(a6, b6, b"hello", &caps).unwrap();
        match classify(&udp, &caps).unwrap() {
            Inbound::Udp { key, payload } => {
                assert_eq!(key, (a6, b6));
                assert_eq!(&udp[payload], b"hello");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_garbage_and_bad_checksums() {
        let caps = ChecksumCapabilities::default();
        assert_eq!(classify(&[], &caps), Err(PacketError::Malformed));
        assert_eq!(classify(&[0x45, 0, 0], &caps), Err(PacketError::Malformed));
        let mut p = syn(addr("10.0.0.2:1"), addr("10.1.2.3:2"), 5);
        // The TCP checksum field (20-byte IPv4 header + offset 16).
        p[36] ^= 0xff;
        assert_eq!(classify(&p, &caps), Err(PacketError::Malformed));
        // A trusted device skips verification.
        assert!(classify(&p, &ChecksumCapabilities::ignored()).is_ok());
    }

    #[test]
    fn refusal_is_an_rst_ack_for_the_syn() {
        let caps = ChecksumCapabilities::default();
        let (a, b) = (addr("10.0.0.2:40000"), addr("10.1.2.3:80"));
        let rst = refuse_syn(&syn(a, b, 1000), &caps).unwrap();
        let ip = Ipv4Packet::new_checked(&rst[..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let (s, d) = (
            IpAddress::from(ip.src_addr()),
            IpAddress::from(ip.dst_addr()),
        );
        let repr = TcpRepr::parse(&tcp, &s, &d, &caps).unwrap();
        assert_eq!((ip_of(s), repr.src_port), (b.ip(), 80));
        assert_eq!((ip_of(d), repr.dst_port), (a.ip(), 40000));
        assert_eq!(repr.control, TcpControl::Rst);
        assert_eq!(repr.ack_number, Some(TcpSeqNumber(1001)));
    }

    #[test]
    fn unreachable_quotes_the_offending_packet_v4_and_v6() {
        let caps = ChecksumCapabilities::default();
        let syn4 = syn(addr("10.0.0.2:40000"), addr("10.9.9.9:80"), 1);
        let icmp = unreachable(&syn4, &caps).unwrap();
        let ip = Ipv4Packet::new_checked(&icmp[..]).unwrap();
        assert_eq!(ip.next_header(), IpProtocol::Icmp);
        // smoltcp's Repr::parse wants the quoted packet whole, so read the fields directly.
        let msg = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(msg.verify_checksum());
        assert_eq!(msg.msg_type(), smoltcp::wire::Icmpv4Message::DstUnreachable);
        assert_eq!(
            msg.msg_code(),
            u8::from(Icmpv4DstUnreachable::HostUnreachable)
        );
        let quoted = Ipv4Packet::new_unchecked(msg.data());
        assert_eq!(IpAddr::V4(quoted.dst_addr()), addr("10.9.9.9:1").ip());
        assert_eq!(
            &msg.data()[20..28],
            &syn4[20..28],
            "ports and sequence number quoted"
        );
        let syn6 = syn(addr("[fd00::2]:40000"), addr("[fd00::9]:443"), 1);
        let icmp = unreachable(&syn6, &caps).unwrap();
        let ip = Ipv6Packet::new_checked(&icmp[..]).unwrap();
        assert_eq!(ip.next_header(), IpProtocol::Icmpv6);
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        let msg = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(msg.verify_checksum(&s, &d));
        assert_eq!(msg.msg_type(), smoltcp::wire::Icmpv6Message::DstUnreachable);
        assert_eq!(
            msg.msg_code(),
            u8::from(Icmpv6DstUnreachable::AddrUnreachable)
        );
        assert_eq!(
            &msg.payload()[40..],
            &syn6[40..],
            "the whole short SYN is quoted"
        );
    }
}
