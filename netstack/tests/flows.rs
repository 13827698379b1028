//! The app (a second smoltcp interface) talks to arbitrary destinations through a NetStack;
//! the test plays the caller that decides where each flow goes.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{App, pattern};
use mirrord_netstack::{Config, Event, Events, NetStack, NewTcp, PacketSink, PacketSource};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn start(config: Config) -> (App, Events) {
    let mtu = config.mtu;
    let (sink, source, events, _) = NetStack::spawn(config).unwrap();
    (App::spawn(sink, source, mtu), events)
}

/// Runs `decide` on every new TCP flow in its own task.
fn serve<F, Fut>(mut events: Events, decide: F)
where
    F: Fn(NewTcp) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Event::Tcp(new) = event {
                tokio::spawn(decide(new));
            }
        }
    });
}

/// Accepts and echoes everything back, then closes after the app's FIN.
async fn echo(new: NewTcp) {
    let mut stream = new.accept().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => stream.write_all(&buf[..n]).await.unwrap(),
            Err(e) => panic!("echo read failed: {e}"),
        }
    }
    stream.shutdown().await.unwrap();
}

#[tokio::test]
async fn tcp_reaches_any_destination_with_its_original_addresses() {
    let (app, mut events) = start(Config::default());
    let a = app.connect(addr("10.1.2.3:80"), 65536);
    let Some(Event::Tcp(new)) = events.next().await else {
        panic!("expected a TCP flow");
    };
    assert_eq!(new.src, addr("10.0.0.2:40000"));
    assert_eq!(new.dst, addr("10.1.2.3:80"));
    tokio::spawn(echo(new));
    a.established().await.unwrap();
    a.write_all(b"hello v4").await.unwrap();
    assert_eq!(a.read_exact(8).await.unwrap(), b"hello v4");

    let b = app.connect(addr("[fd00::5]:443"), 65536);
    let Some(Event::Tcp(new)) = events.next().await else {
        panic!("expected a TCP flow");
    };
    assert_eq!(new.src, addr("[fd00::2]:40001"));
    assert_eq!(new.dst, addr("[fd00::5]:443"));
    let stream = new.accept().unwrap();
    assert_eq!(
        (stream.src(), stream.dst()),
        (addr("[fd00::2]:40001"), addr("[fd00::5]:443"))
    );
    let (mut r, mut w) = tokio::io::split(stream);
    b.established().await.unwrap();
    b.write_all(b"hello v6").await.unwrap();
    let mut got = [0u8; 8];
    r.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello v6");
    w.write_all(b"reply").await.unwrap();
    assert_eq!(b.read_exact(5).await.unwrap(), b"reply");
}

#[tokio::test]
async fn refused_connection_is_reset_and_unreachable_gets_icmp_at_once() {
    let (app, events) = start(Config::default());
    serve(events, |new| async move {
        if new.dst.port() == 81 {
            new.refuse();
        } else {
            new.unreachable();
        }
    });
    let refused = app.connect(addr("10.1.2.3:81"), 4096);
    let res = tokio::time::timeout(Duration::from_secs(1), refused.established()).await;
    assert_eq!(
        res.unwrap(),
        Err(tcp::State::Closed),
        "RST makes connect fail"
    );

    let unreachable = app.connect(addr("[fd00::9]:80"), 4096);
    tokio::time::timeout(Duration::from_secs(1), async {
        while app.icmp_received().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let icmp = app.icmp_received();
    assert_eq!(icmp.len(), 1);
    // ICMPv6 type 1 (destination unreachable), code 3 (address unreachable), from the target.
    assert_eq!(icmp[0][6], u8::from(IpProtocol::Icmpv6));
    assert_eq!(&icmp[0][40..42], &[1, 3]);
    assert_eq!(
        &icmp[0][8..24],
        &"fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets()
    );
    // smoltcp (the fake app) ignores ICMP for TCP; a kernel fails connect with EHOSTUNREACH.
    assert_eq!(unreachable.state(), tcp::State::SynSent);
}

#[tokio::test(start_paused = true)]
async fn retransmitted_syns_during_a_slow_decision_make_one_flow() {
    let (app, events) = start(Config::default());
    let flows = Arc::new(AtomicUsize::new(0));
    let counted = flows.clone();
    serve(events, move |new| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            // Connecting the remote side takes longer than several SYN retransmissions.
            tokio::time::sleep(Duration::from_secs(5)).await;
            echo(new).await;
        }
    });
    let conn = app.connect(addr("10.1.2.3:8080"), 4096);
    conn.established().await.unwrap();
    conn.write_all(b"ping").await.unwrap();
    assert_eq!(conn.read_exact(4).await.unwrap(), b"ping");
    assert_eq!(flows.load(Ordering::SeqCst), 1);
}

/// `conns` connections, half IPv4 and half IPv6, each echoing `bytes` through the stack; every
/// connection's echo must match what it sent, byte for byte and by checksum.
async fn echo_many(conns: u32, bytes: usize) {
    // The stack's receive window stays unscaled here: a scaled smoltcp window is rounded down
    // and its right edge shrinks, and the fake app's sender (smoltcp too, unlike a kernel) can
    // then strand bytes sent past the edge without a retransmit timer.
    let config = Config {
        tcp_rx_buffer: usize::from(u16::MAX),
        tcp_tx_buffer: 128 * 1024,
        ..Config::default()
    };
    let (app, events) = start(config);
    serve(events, echo);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let dst = if i % 2 == 0 {
            SocketAddr::new(
                format!("10.7.{}.{}", i / 200, i % 200 + 1).parse().unwrap(),
                5000,
            )
        } else {
            SocketAddr::new(format!("fd00::7:{i:x}").parse().unwrap(), 6000)
        };
        let conn = app.connect(dst, 128 * 1024);
        tasks.push(tokio::spawn(async move {
            conn.established().await.unwrap();
            let data = pattern(i, bytes);
            let (sent, got) = tokio::join!(
                async {
                    conn.write_all(&data).await.unwrap();
                    conn.shutdown();
                },
                // Exactly the echoed bytes: once both FINs are through, the stack forgets the
                // connection and may answer a late window update with RST, as a kernel would.
                conn.read_exact(bytes)
            );
            let () = sent;
            let got = got.unwrap();
            let first_diff = got.iter().zip(&data).position(|(a, b)| a != b);
            assert!(
                got == data && fnv1a(&got) == fnv1a(&data),
                "connection {i} corrupted data: got {} of {} bytes, first difference at {first_diff:?}",
                got.len(),
                data.len()
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// FNV-1a, an end-to-end checksum independent of TCP's own.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_connections_move_data_intact() {
    echo_many(128, 256 * 1024).await;
}

/// The load the tunnel must carry end to end: 200 connections moving 1 MiB each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_connections_echo_a_mebibyte_each() {
    echo_many(200, 1 << 20).await;
}

/// A vectored write takes the slices in order, as far as the socket's buffer has room, and
/// what does not fit goes in later writes: the app gets every byte, in order.
#[tokio::test]
async fn vectored_writes_arrive_whole_and_in_order() {
    let (app, mut events) = start(Config::default());
    let conn = app.connect(addr("10.1.2.3:80"), 4 << 20);
    let Some(Event::Tcp(new)) = events.next().await else {
        panic!("expected a TCP flow");
    };
    let mut stream = new.accept().unwrap();
    conn.established().await.unwrap();
    assert!(tokio::io::AsyncWrite::is_write_vectored(&stream));
    // Frames as the link delivers them: many, of uneven sizes, an empty one among them, more
    // than the socket's starting buffer in all.
    let frames: Vec<Vec<u8>> = (0..40usize)
        .map(|i| pattern(i as u32, (i * 7919) % 65536))
        .collect();
    let expected = frames.concat();
    let writer = tokio::spawn(async move {
        let mut slices: Vec<std::io::IoSlice<'_>> = frames
            .iter()
            .map(|frame| std::io::IoSlice::new(frame))
            .collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let n = stream.write_vectored(slices).await.unwrap();
            assert!(n > 0);
            std::io::IoSlice::advance_slices(&mut slices, n);
        }
        stream.shutdown().await.unwrap();
        stream
    });
    let got = conn.read_to_end().await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "bytes out of order");
    drop(writer.await.unwrap());
}

#[tokio::test]
async fn half_close_works_both_ways() {
    let (app, mut events) = start(Config::default());

    // The app shuts down its write side first: the caller reads EOF and still answers.
    let conn = app.connect(addr("10.1.2.3:80"), 65536);
    let Some(Event::Tcp(new)) = events.next().await else {
        panic!("expected a TCP flow");
    };
    let mut stream = new.accept().unwrap();
    conn.established().await.unwrap();
    conn.write_all(b"request").await.unwrap();
    conn.shutdown();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    stream.write_all(b"response").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(conn.read_to_end().await.unwrap(), b"response");
    drop(stream);

    // The caller shuts down first: the app reads EOF and can still send.
    let conn = app.connect(addr("10.1.2.3:80"), 65536);
    let Some(Event::Tcp(new)) = events.next().await else {
        panic!("expected a TCP flow");
    };
    let mut stream = new.accept().unwrap();
    stream.write_all(b"banner").await.unwrap();
    stream.shutdown().await.unwrap();
    conn.established().await.unwrap();
    assert_eq!(conn.read_to_end().await.unwrap(), b"banner");
    conn.write_all(b"late words").await.unwrap();
    conn.shutdown();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"late words");
    drop(stream);
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while !matches!(conn.state(), tcp::State::TimeWait | tcp::State::Closed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "clean close, not a reset: {:?}",
        conn.state()
    );
}

#[tokio::test]
async fn resets_propagate_both_ways() {
    let (app, mut events) = start(Config::default());
    let mut next = async || match events.next().await {
        Some(Event::Tcp(new)) => new.accept().unwrap(),
        _ => panic!("expected a TCP flow"),
    };

    // The caller aborts: the app's read fails.
    let conn = app.connect(addr("10.1.2.3:80"), 65536);
    let stream = next().await;
    conn.established().await.unwrap();
    stream.abort();
    let err = conn.read_some(100).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);

    // The caller drops the stream without shutting down: also a reset, never a clean EOF.
    let conn = app.connect(addr("10.1.2.3:80"), 65536);
    let stream = next().await;
    conn.established().await.unwrap();
    drop(stream);
    let err = conn.read_some(100).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);

    // The app resets: the caller's read returns ConnectionReset.
    let conn = app.connect(addr("10.1.2.3:80"), 65536);
    let mut stream = next().await;
    conn.established().await.unwrap();
    conn.write_all(b"partial").await.unwrap();
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).await.unwrap();
    conn.abort();
    let err = stream.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let err = stream.write_all(b"x").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test(start_paused = true)]
async fn idle_connection_survives_simulated_hours() {
    let (app, events) = start(Config::default());
    serve(events, echo);
    let conn = app.connect(addr("10.1.2.3:5432"), 65536);
    conn.established().await.unwrap();
    conn.write_all(b"before").await.unwrap();
    assert_eq!(conn.read_exact(6).await.unwrap(), b"before");
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(conn.state(), tcp::State::Established);
    conn.write_all(b"after").await.unwrap();
    assert_eq!(conn.read_exact(5).await.unwrap(), b"after");
}

fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("v4 only in this helper");
    };
    let caps = ChecksumCapabilities::default();
    let ip = Ipv4Repr {
        src_addr: *s.ip(),
        dst_addr: *d.ip(),
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; 20 + 8 + payload.len()];
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut p, &caps);
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    udp.emit(
        &mut UdpPacket::new_unchecked(p.payload_mut()),
        &IpAddress::from(*s.ip()),
        &IpAddress::from(*d.ip()),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// (src, dst, payload) of a UDP packet for the app.
fn parse_udp(packet: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    let caps = ChecksumCapabilities::default();
    let ip = Ipv4Packet::new_checked(packet).unwrap();
    let repr = Ipv4Repr::parse(&ip, &caps).unwrap();
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    let (s, d) = (
        IpAddress::from(repr.src_addr),
        IpAddress::from(repr.dst_addr),
    );
    let u = UdpRepr::parse(&udp, &s, &d, &caps).unwrap();
    (
        SocketAddr::new(repr.src_addr.into(), u.src_port),
        SocketAddr::new(repr.dst_addr.into(), u.dst_port),
        udp.payload().to_vec(),
    )
}

async fn raw_stack(config: Config) -> (PacketSink, PacketSource, Events) {
    let (sink, source, events, _) = NetStack::spawn(config).unwrap();
    (sink, source, events)
}

#[tokio::test(start_paused = true)]
async fn udp_datagrams_become_flows_and_replies_come_from_the_destination() {
    let config = Config {
        udp_idle: Duration::from_secs(30),
        ..Config::default()
    };
    let (sink, mut source, mut events) = raw_stack(config).await;
    let (app, dns) = (addr("10.0.0.2:5353"), addr("10.96.0.10:53"));
    let other = addr("10.96.0.11:53");
    sink.send(udp_packet(app, dns, b"query-1")).unwrap();
    sink.send(udp_packet(app, other, b"elsewhere")).unwrap();
    sink.send(udp_packet(app, dns, b"query-2")).unwrap();

    let Some(Event::Udp(mut flow)) = events.next().await else {
        panic!("expected a UDP flow");
    };
    assert_eq!((flow.src, flow.dst), (app, dns));
    let Some(Event::Udp(mut second)) = events.next().await else {
        panic!("expected a UDP flow");
    };
    assert_eq!((second.src, second.dst), (app, other));
    assert_eq!(flow.recv().await.unwrap(), b"query-1");
    assert_eq!(flow.recv().await.unwrap(), b"query-2");
    assert_eq!(second.recv().await.unwrap(), b"elsewhere");

    flow.send(b"answer").unwrap();
    let (src, dst, payload) = parse_udp(&source.recv().await.unwrap());
    assert_eq!((src, dst, payload.as_slice()), (dns, app, &b"answer"[..]));

    // No traffic for longer than udp_idle: the flow ends and a new datagram opens a new one.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(flow.recv().await, None);
    assert!(flow.send(b"late").is_err());
    sink.send(udp_packet(app, dns, b"query-3")).unwrap();
    let Some(Event::Udp(mut again)) = events.next().await else {
        panic!("expected a UDP flow");
    };
    assert_eq!(again.recv().await.unwrap(), b"query-3");
}
