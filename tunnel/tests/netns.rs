//! A process started in a fresh network namespace gets the TUN device, its address and its
//! routes, and mirrord (this test process, in the host namespace) reads and writes its packets.
//!
//! Every packet stays inside the child's namespace: its only interfaces are `lo` (down) and the
//! TUN, whose other end is this test. Needs root (like the launcher's own tests).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use mirrord_tunnel::{DEFAULT_MTU, DEFAULT_NAME, TunDevice, TunError, TunPlan, TunStep};

const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x213, 0, 0, 0, 0, 0, 2);
/// A "remote" address: routed into the TUN, where only this test answers.
const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);

/// Who the child is when it creates its namespaces.
#[derive(Clone, Copy)]
enum As {
    Root,
    /// Root, with IPv6 disabled in the new namespace before the TUN is created.
    RootWithoutIpv6,
    /// An unprivileged uid/gid that first creates its own user namespace (mapped to root).
    Rootless(u32),
}

/// Starts `argv` in a new network namespace after `plan.create_in_child()`. On failure, returns
/// the step and errno the child reported.
fn spawn_in_netns(
    plan: TunPlan,
    who: As,
    argv: &[&str],
) -> Result<Child, (io::Error, Option<(TunStep, i32)>)> {
    let mut pipe = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(
        unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
        0
    );
    // SAFETY: just created, owned by nothing else.
    let (report_rx, report_tx) =
        unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let report_fd = report_tx.as_raw_fd();
    let maps = match who {
        As::Root | As::RootWithoutIpv6 => None,
        As::Rootless(id) => Some((format!("0 {id} 1\n"), format!("0 {id} 1\n"))),
    };

    let mut command = Command::new(argv[0]);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let As::Rootless(id) = who {
        command.uid(id).gid(id);
    }
    let child_steps = move || -> io::Result<()> {
        // Only raw syscalls on buffers prepared above: this runs between fork and exec.
        // SAFETY: raw syscalls on constant paths and prepared buffers.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if let Some((uid_map, gid_map)) = &maps {
                // Dropping root made the process non-dumpable, which makes /proc/self/* root's.
                libc::prctl(libc::PR_SET_DUMPABLE, 1);
                if libc::unshare(libc::CLONE_NEWUSER) < 0 {
                    return Err(io::Error::last_os_error());
                }
                for (path, data) in [
                    (c"/proc/self/setgroups", "deny"),
                    (c"/proc/self/uid_map", uid_map.as_str()),
                    (c"/proc/self/gid_map", gid_map.as_str()),
                ] {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, data.as_ptr().cast(), data.len()) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
            }
            if libc::unshare(libc::CLONE_NEWNET) < 0 {
                return Err(io::Error::last_os_error());
            }
            if matches!(who, As::RootWithoutIpv6) {
                // /proc/sys/net belongs to the opener's namespace: the new one.
                for path in [
                    c"/proc/sys/net/ipv6/conf/all/disable_ipv6",
                    c"/proc/sys/net/ipv6/conf/default/disable_ipv6",
                ] {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"1".as_ptr().cast(), 1) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
            }
        }
        plan.create_in_child().map_err(|(step, errno)| {
            let mut record = [0u8; 8];
            record[..4].copy_from_slice(&step.code().to_ne_bytes());
            record[4..].copy_from_slice(&errno.to_ne_bytes());
            // SAFETY: write(2) of a stack buffer.
            unsafe { libc::write(report_fd, record.as_ptr().cast(), record.len()) };
            io::Error::from_raw_os_error(errno)
        })
    };
    // SAFETY: the closure only makes async-signal-safe syscalls on prepared buffers.
    unsafe { command.pre_exec(child_steps) };
    let spawned = command.spawn();
    // Drops the plan, i.e. the child's end of the socket pair, in this process.
    drop(command);
    drop(report_tx);
    spawned.map_err(|err| {
        let mut record = [0u8; 8];
        // SAFETY: read(2) into a stack buffer.
        let n = unsafe { libc::read(report_rx.as_raw_fd(), record.as_mut_ptr().cast(), 8) };
        let report = (n == 8)
            .then(|| {
                let step = u32::from_ne_bytes([record[0], record[1], record[2], record[3]]);
                let errno = i32::from_ne_bytes([record[4], record[5], record[6], record[7]]);
                TunStep::from_code(step).map(|s| (s, errno))
            })
            .flatten();
        (err, report)
    })
}

fn finish(child: Child) -> Output {
    let output = child.wait_with_output().expect("wait for the child");
    assert!(
        output.status.success(),
        "child failed: {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The interface name of a TUN descriptor (TUNGETIFF).
fn tun_name(fd: &OwnedFd) -> String {
    // SAFETY: plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF fills the ifreq on this frame.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
    assert_eq!(ret, 0, "TUNGETIFF: {}", io::Error::last_os_error());
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&name).into_owned()
}

#[test]
fn the_child_gets_the_tun_with_its_addresses_mtu_and_default_routes() {
    let (plan, receiver) =
        TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, (POD_V4, 32), Some((POD_V6, 128))).expect("plan");
    let child = spawn_in_netns(
        plan,
        As::Root,
        &[
            "sh",
            "-c",
            "ip -o link show dev mirrord0; echo ---; ip -o addr show dev mirrord0; echo ---; \
             ip -4 route; echo ---; ip -6 route; echo ---; ip -o link | wc -l",
        ],
    )
    .map_err(|(e, report)| format!("{e} {report:?}"))
    .expect("spawn");
    let fd = receiver.receive().expect("the TUN descriptor");
    let diag = receiver
        .receive_listener_socket()
        .expect("the sock_diag socket");
    let mut protocol: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes one int into `protocol`, whose size is in `len`.
    let got = unsafe {
        libc::getsockopt(
            diag.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&raw mut protocol).cast(),
            &mut len,
        )
    };
    assert_eq!((got, protocol), (0, libc::NETLINK_SOCK_DIAG));
    let output = finish(child);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let parts: Vec<&str> = text.split("---\n").collect();
    assert_eq!(parts.len(), 5, "{text}");
    let (link, addrs, routes4, routes6, links) = (parts[0], parts[1], parts[2], parts[3], parts[4]);
    assert!(link.contains("mirrord0: <"), "{link}");
    assert!(link.contains(",UP,") || link.contains(",UP>"), "{link}");
    assert!(link.contains("LOWER_UP"), "{link}");
    assert!(link.contains(&format!("mtu {DEFAULT_MTU}")), "{link}");
    assert!(addrs.contains("inet 10.213.0.2/32"), "{addrs}");
    assert!(addrs.contains("inet6 fd00:213::2/128"), "{addrs}");
    assert!(
        routes4
            .lines()
            .any(|l| l.trim() == "default dev mirrord0 scope link"),
        "{routes4}"
    );
    assert!(
        routes6
            .lines()
            .any(|l| l.starts_with("default dev mirrord0 metric 1024")),
        "{routes6}"
    );
    // lo and the TUN: nothing else leads out of the namespace.
    assert_eq!(links.trim(), "2", "{links}");
    assert_eq!(tun_name(&fd), DEFAULT_NAME);
    // SAFETY: fcntl only queries the descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
}

#[test]
fn a_failed_step_is_reported_with_its_name() {
    // IPv6 switched off inside the child's own namespace: the IPv4 part succeeds, then the
    // IPv6 address is refused and no descriptor is ever sent.
    let (plan, receiver) =
        TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, (POD_V4, 32), Some((POD_V6, 128))).expect("plan");
    let (err, report) = spawn_in_netns(plan, As::RootWithoutIpv6, &["true"])
        .expect_err("IPv6 is off, so the setup fails");
    let (step, errno) = report.expect("the child reports the failed step");
    assert_eq!(step, TunStep::Ipv6Address, "{err}");
    let msg = TunError::from_child(step, errno).to_string();
    assert!(
        msg.starts_with("setting the TUN interface's IPv6 address: "),
        "{msg}"
    );
    assert!(receiver.receive().is_err());
    for step in TunStep::ALL {
        let msg = TunError::from_child(step, libc::EPERM).to_string();
        assert!(msg.contains("Operation not permitted"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn a_rootless_child_without_access_to_dev_net_tun_gets_a_clear_error() {
    let (plan, receiver) =
        TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, (POD_V4, 32), None).expect("plan");
    let mode = std::fs::metadata("/dev/net/tun")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .expect("/dev/net/tun");
    let nobody = 65534;
    match spawn_in_netns(plan, As::Rootless(nobody), &["true"]) {
        Ok(child) => {
            // Mode 0666 (as most distributions ship it): rootless works end to end.
            assert_eq!(mode & 0o006, 0o006, "opened a mode {mode:o} /dev/net/tun");
            finish(child);
            let fd = receiver.receive().expect("the TUN descriptor");
            assert_eq!(tun_name(&fd), DEFAULT_NAME);
        }
        Err((err, report)) => {
            assert_eq!(
                mode & 0o006,
                0,
                "failed with mode {mode:o}: {err} {report:?}"
            );
            let Some((step, errno)) = report else {
                panic!("the child failed before the TUN step: {err}");
            };
            assert_eq!(step, TunStep::Open);
            assert!(matches!(errno, libc::EACCES | libc::EPERM), "{errno}");
            let msg = TunError::from_child(step, errno).to_string();
            assert!(
                msg.starts_with("creating the TUN device (/dev/net/tun): "),
                "{msg}"
            );
            assert!(msg.contains("mode 0666"), "{msg}");
            assert!(receiver.receive().is_err());
        }
    }
}

/// The ones' complement sum of 16-bit words, folded.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        for w in chunk.chunks(2) {
            let word = if w.len() == 2 {
                u16::from_be_bytes([w[0], w[1]])
            } else {
                u16::from_be_bytes([w[0], 0])
            };
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

const UDP: u8 = libc::IPPROTO_UDP as u8;

/// One UDP datagram as it crosses the TUN.
#[derive(Debug, PartialEq)]
struct Datagram {
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
}

impl Datagram {
    /// The IP packet, with correct IP (v4) and UDP checksums.
    fn packet(&self) -> Vec<u8> {
        let udp_len = 8 + self.payload.len();
        let mut udp = vec![0u8; udp_len];
        udp[0..2].copy_from_slice(&self.src.port().to_be_bytes());
        udp[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        udp[8..].copy_from_slice(&self.payload);
        let (mut packet, pseudo) = match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut h = vec![0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
                h[6] = 0x40; // don't fragment
                h[8] = 64;
                h[9] = UDP;
                h[12..16].copy_from_slice(&src.octets());
                h[16..20].copy_from_slice(&dst.octets());
                let sum = checksum(&[&h]);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                let mut pseudo = h[12..20].to_vec();
                pseudo.extend_from_slice(&[0, UDP]);
                pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
                (h, pseudo)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
                h[6] = UDP;
                h[7] = 64;
                h[8..24].copy_from_slice(&src.octets());
                h[24..40].copy_from_slice(&dst.octets());
                let mut pseudo = h[8..40].to_vec();
                pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, UDP]);
                (h, pseudo)
            }
            _ => panic!("mixed address families"),
        };
        let sum = match checksum(&[&pseudo, &udp]) {
            0 => 0xffff,
            sum => sum,
        };
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        packet.extend_from_slice(&udp);
        packet
    }

    /// Parses an IPv4 or IPv6 (no extension headers) UDP packet; anything else is `None`.
    fn parse(p: &[u8]) -> Option<Datagram> {
        let (src, dst, udp): (IpAddr, IpAddr, &[u8]) = match p.first()? >> 4 {
            4 if p.len() >= 20 && p[9] == UDP => {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
                let four = |at: usize| [p[at], p[at + 1], p[at + 2], p[at + 3]];
                (
                    Ipv4Addr::from(four(12)).into(),
                    Ipv4Addr::from(four(16)).into(),
                    p.get(ihl..total)?,
                )
            }
            6 if p.len() >= 40 && p[6] == UDP => {
                let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
                let sixteen =
                    |at: usize| -> Option<[u8; 16]> { p.get(at..at + 16)?.try_into().ok() };
                (
                    Ipv6Addr::from(sixteen(8)?).into(),
                    Ipv6Addr::from(sixteen(24)?).into(),
                    p.get(40..40 + len)?,
                )
            }
            _ => return None,
        };
        if udp.len() < 8 {
            return None;
        }
        Some(Datagram {
            src: SocketAddr::new(src, u16::from_be_bytes([udp[0], udp[1]])),
            dst: SocketAddr::new(dst, u16::from_be_bytes([udp[2], udp[3]])),
            payload: udp[8..].to_vec(),
        })
    }
}

#[test]
fn crafted_datagrams_have_valid_checksums_and_parse_back() {
    for (src, dst) in [
        (
            SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 1000)),
            SocketAddr::from((Ipv4Addr::new(192, 0, 2, 2), 2000)),
        ),
        (
            SocketAddr::from((POD_V6, 1000)),
            SocketAddr::from((REMOTE_V6, 2000)),
        ),
    ] {
        let datagram = Datagram {
            src,
            dst,
            payload: b"abc".to_vec(),
        };
        let p = datagram.packet();
        assert_eq!(Datagram::parse(&p).as_ref(), Some(&datagram));
        // Re-summing with the checksum in place gives zero.
        let (ip_len, mut pseudo) = if src.is_ipv4() {
            assert_eq!(checksum(&[&p[..20]]), 0);
            let mut pseudo = p[12..20].to_vec();
            pseudo.extend_from_slice(&[0, UDP, 0, 11]);
            (20, pseudo)
        } else {
            let mut pseudo = p[8..40].to_vec();
            pseudo.extend_from_slice(&[0, 0, 0, 11, 0, 0, 0, UDP]);
            (40, pseudo)
        };
        pseudo.extend_from_slice(&p[ip_len..]);
        assert_eq!(checksum(&[&pseudo]), 0);
    }
}

/// The child sends a datagram to `remote`:9 and prints the reply; this test, holding the TUN,
/// checks the request and answers it. With `offload`, both cross the virtio-net header.
fn udp_round_trip(pod: IpAddr, remote: IpAddr, offload: bool) {
    let v6 = pod.is_ipv6().then_some((POD_V6, 128));
    let (plan, receiver) = TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, (POD_V4, 32), v6).expect("plan");
    let plan = plan.with_offload(offload);
    let family = if remote.is_ipv6() {
        "AF_INET6"
    } else {
        "AF_INET"
    };
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
         s.settimeout(10)\n\
         s.sendto(b'hello from the pod', ('{remote}', 9))\n\
         data, addr = s.recvfrom(100)\n\
         print(data.decode(), addr[0], addr[1])\n"
    );
    let child = spawn_in_netns(plan, As::Root, &["python3", "-c", &script])
        .map_err(|(e, report)| format!("{e} {report:?}"))
        .expect("spawn");
    let fd = receiver.receive().expect("the TUN descriptor");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exchanged = runtime.block_on(async {
        let tun = TunDevice::new(fd)?;
        assert_eq!(
            tun.offload(),
            offload,
            "the device says whether it has offload"
        );
        let mut buf = vec![0u8; mirrord_tunnel::MAX_PACKET];
        let request = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let n = tun.recv(&mut buf).await?;
                // Anything else the kernel sends (IPv6 router solicitations…) is not ours.
                if let Some(datagram) = Datagram::parse(&buf[..n])
                    && datagram.dst == SocketAddr::new(remote, 9)
                {
                    return io::Result::Ok(datagram);
                }
            }
        })
        .await
        .map_err(|_| io::Error::other("no datagram came through the TUN"))??;
        let reply = Datagram {
            src: request.dst,
            dst: request.src,
            payload: b"hello from mirrord".to_vec(),
        };
        tun.send(&reply.packet()).await?;
        io::Result::Ok(request)
    });
    let request = match exchanged {
        Ok(request) => request,
        Err(e) => {
            let output = child.wait_with_output();
            panic!("{e}; child: {output:?}");
        }
    };
    assert_eq!(request.src.ip(), pod, "the pod's address is the source");
    assert_eq!(request.payload, b"hello from the pod");
    let output = finish(child);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("hello from mirrord {remote} 9")
    );
}

#[test]
fn a_udp_datagram_goes_out_through_the_tun_and_the_reply_comes_back() {
    udp_round_trip(POD_V4.into(), REMOTE_V4.into(), false);
}

#[test]
fn an_ipv6_udp_datagram_goes_out_through_the_tun_and_the_reply_comes_back() {
    udp_round_trip(POD_V6.into(), REMOTE_V6.into(), false);
}

#[test]
fn datagrams_cross_a_tun_with_offload_both_ways() {
    udp_round_trip(POD_V4.into(), REMOTE_V4.into(), true);
    udp_round_trip(POD_V6.into(), REMOTE_V6.into(), true);
}
