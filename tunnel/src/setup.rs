//! Creating the TUN device inside the launched process's network namespace and handing its
//! descriptor to mirrord; the child side must never allocate, lock or touch the filesystem
//! beyond `/dev/net/tun` (it runs between fork and exec of a multi-threaded process).
//!
//! Why the child does it: Rust's spawn only returns after exec, and mirrord cannot join the
//! child's namespaces afterwards in general (a rootless child's namespaces belong to its own user
//! namespace, which a multi-threaded process cannot enter). So everything is configured with
//! classic ioctls (no netlink: no buffers to build or parse after the fork), on stack structures
//! and on the plan's own buffers, then the descriptor travels over a `SOCK_SEQPACKET` pair with
//! `SCM_RIGHTS`.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The interface name inside the launched process's namespace.
pub const DEFAULT_NAME: &str = "mirrord0";

/// The largest multiple of 8 under the TUN device's 65535 limit (pasta's default too): a TCP
/// MSS of 65480 keeps the per-packet cost of the TUN path low, fragment offsets (units of 8
/// bytes) stay exact, and smoltcp handles any IPv4/IPv6 packet up to 65535 bytes.
pub const DEFAULT_MTU: u32 = 65520;

/// Linux refuses IPv4 on a device below 68 bytes and a TUN above 65535.
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;
/// IPv6 is disabled on a device whose MTU is below this.
const MIN_MTU_IPV6: u32 = 1280;

const TUN_PATH: &CStr = c"/dev/net/tun";

/// One step of [`TunPlan::create_in_child`], reported with its errno when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunStep {
    Open = 1,
    SetInterface,
    ControlSocket,
    Mtu,
    Ipv4Address,
    Ipv4Netmask,
    Up,
    Ipv4Route,
    InterfaceIndex,
    Ipv6Socket,
    Ipv6Address,
    Ipv6Route,
    SendDescriptor,
    ListenerSocket,
    Offload,
}

impl TunStep {
    pub const ALL: [TunStep; 15] = [
        TunStep::Open,
        TunStep::SetInterface,
        TunStep::ControlSocket,
        TunStep::Mtu,
        TunStep::Ipv4Address,
        TunStep::Ipv4Netmask,
        TunStep::Up,
        TunStep::Ipv4Route,
        TunStep::InterfaceIndex,
        TunStep::Ipv6Socket,
        TunStep::Ipv6Address,
        TunStep::Ipv6Route,
        TunStep::SendDescriptor,
        TunStep::ListenerSocket,
        TunStep::Offload,
    ];

    /// A stable non-zero number for carrying the step through a report pipe.
    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(code: u32) -> Option<TunStep> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }
}

impl fmt::Display for TunStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TunStep::Open => "creating the TUN device (/dev/net/tun)",
            TunStep::SetInterface => "creating the TUN interface (TUNSETIFF)",
            TunStep::ControlSocket => "opening an IPv4 control socket",
            TunStep::Mtu => "setting the TUN interface's MTU",
            TunStep::Ipv4Address => "setting the TUN interface's IPv4 address",
            TunStep::Ipv4Netmask => "setting the TUN interface's IPv4 netmask",
            TunStep::Up => "bringing the TUN interface up",
            TunStep::Ipv4Route => "adding the IPv4 default route through the TUN interface",
            TunStep::InterfaceIndex => "reading the TUN interface's index",
            TunStep::Ipv6Socket => "opening an IPv6 control socket (is IPv6 disabled?)",
            TunStep::Ipv6Address => "setting the TUN interface's IPv6 address",
            TunStep::Ipv6Route => "adding the IPv6 default route through the TUN interface",
            TunStep::SendDescriptor => "handing the TUN device to mirrord",
            TunStep::Offload => "turning on the TUN device's offload (TUNSETOFFLOAD)",
            TunStep::ListenerSocket => {
                "opening the netlink sock_diag socket that follows the command's listening ports"
            }
        })
    }
}

/// Errors carry their OS error in the message rather than as a `source`, so printing one gives
/// exactly one line.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("invalid TUN interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid TUN MTU {mtu}: {reason}")]
    InvalidMtu { mtu: u32, reason: &'static str },
    #[error("invalid prefix length /{prefix} for {addr}")]
    InvalidPrefix { addr: IpAddr, prefix: u8 },
    #[error("cannot create the socket pair that carries the TUN device: {0}")]
    SocketPair(io::Error),
    #[error(
        "{step}: {err}: /dev/net/tun must be readable and writable by you (most distributions \
         ship it with mode 0666; as root: `chmod 0666 /dev/net/tun`), or run mirrord as root"
    )]
    TunDenied { step: TunStep, err: io::Error },
    #[error("{step}: {err}")]
    Setup { step: TunStep, err: io::Error },
    #[error("the launched process did not hand over its TUN device: {0}")]
    NotReceived(io::Error),
}

impl TunError {
    /// The error for a step that failed in the child, as [`TunPlan::create_in_child`] reports it.
    pub fn from_child(step: TunStep, errno: i32) -> TunError {
        let err = io::Error::from_raw_os_error(errno);
        match (step, errno) {
            (TunStep::Open, libc::EACCES | libc::EPERM) => TunError::TunDenied { step, err },
            _ => TunError::Setup { step, err },
        }
    }
}

/// Everything the child needs to create the TUN device, prepared before the fork.
///
/// Holds the child's end of the socket pair (close-on-exec, so the command never inherits it);
/// drop the plan once spawn returned.
pub struct TunPlan {
    /// NUL-padded: `ifr_name` and `rt_dev` both read it in place.
    name: [libc::c_char; libc::IFNAMSIZ],
    mtu: u32,
    v4: (Ipv4Addr, u8),
    v6: Option<(Ipv6Addr, u8)>,
    /// Checksum and TCP segmentation offload ([`TunPlan::with_offload`]).
    offload: bool,
    socket: OwnedFd,
}

impl std::fmt::Debug for TunPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunPlan")
            .field("mtu", &self.mtu)
            .field("v4", &self.v4)
            .field("v6", &self.v6)
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

/// mirrord's end of the socket pair, on which the child sends the TUN descriptor.
pub struct TunReceiver {
    socket: OwnedFd,
}

/// `struct rtentry` of linux/route.h (libc has it only for some C libraries).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `struct in6_rtmsg` of linux/ipv6_route.h (libc's has private fields).
#[repr(C)]
struct In6RtMsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

/// Room for one `SCM_RIGHTS` descriptor, aligned like a `cmsghdr`.
#[repr(C)]
struct FdCmsg {
    header: libc::cmsghdr,
    fd: libc::c_int,
    /// CMSG_SPACE rounds the payload up to the header's alignment.
    _pad: libc::c_int,
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(ret: libc::c_int) -> Result<libc::c_int, i32> {
    if ret < 0 { Err(errno()) } else { Ok(ret) }
}

/// Closes `fd` when dropped; plain `close(2)`, so it is async-signal-safe.
struct RawGuard(RawFd);

impl Drop for RawGuard {
    fn drop(&mut self) {
        // SAFETY: the guard owns a descriptor opened in this function's caller.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes); every bit pattern is a
    // valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn v4_netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

fn in6(addr: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: addr.octets(),
    }
}

impl TunPlan {
    /// Validates the configuration and creates the socket pair. `v4`/`v6` are the pod's
    /// addresses with their prefix length (normally /32 and /128: the default route sends every
    /// non-loopback destination to the device anyway).
    pub fn new(
        name: &str,
        mtu: u32,
        v4: (Ipv4Addr, u8),
        v6: Option<(Ipv6Addr, u8)>,
    ) -> Result<(TunPlan, TunReceiver), TunError> {
        let name = interface_name(name)?;
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(TunError::InvalidMtu {
                mtu,
                reason: "a TUN interface takes 68 to 65535",
            });
        }
        if v6.is_some() && mtu < MIN_MTU_IPV6 {
            return Err(TunError::InvalidMtu {
                mtu,
                reason: "IPv6 needs at least 1280",
            });
        }
        if v4.1 > 32 {
            return Err(TunError::InvalidPrefix {
                addr: v4.0.into(),
                prefix: v4.1,
            });
        }
        if let Some((addr, prefix)) = v6
            && prefix > 128
        {
            return Err(TunError::InvalidPrefix {
                addr: addr.into(),
                prefix,
            });
        }
        let mut fds = [-1; 2];
        // SAFETY: socketpair(2) writes two descriptors into the array.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } < 0
        {
            return Err(TunError::SocketPair(io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (parent, child) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((
            TunPlan {
                name,
                mtu,
                v4,
                v6,
                offload: false,
                socket: child,
            },
            TunReceiver { socket: parent },
        ))
    }

    /// Creates the device with checksum and TCP segmentation offload (`IFF_VNET_HDR`, then
    /// `TUNSETOFFLOAD` with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`): the kernel hands TCP sends
    /// over as segments of up to 64 KiB without computing their checksums, and each packet
    /// carries a virtio-net header, which [`crate::TunDevice`] reads and writes.
    pub fn with_offload(mut self, on: bool) -> TunPlan {
        self.offload = on;
        self
    }

    /// Creates and configures the TUN device in the current network namespace and sends its
    /// descriptor to the [`TunReceiver`]. Call once, in the forked child, after unsharing the
    /// network namespace (and after `lo` is up if the caller wants it).
    ///
    /// Async-signal-safe: raw syscalls on the plan and on stack structures only. On failure,
    /// pass the step and errno to [`TunError::from_child`] in the parent.
    pub fn create_in_child(&self) -> Result<(), (TunStep, i32)> {
        use TunStep::*;
        let at = |step: TunStep| move |err: i32| (step, err);
        // SAFETY: open(2) on a constant NUL-terminated path.
        let tun = check(unsafe { libc::open(TUN_PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
            .map_err(at(Open))?;
        let tun = RawGuard(tun);

        let mut req = self.ifreq();
        let vnet_hdr = if self.offload { libc::IFF_VNET_HDR } else { 0 };
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | vnet_hdr) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes an ifreq that lives on this frame.
        check(unsafe { libc::ioctl(tun.0, libc::TUNSETIFF, &mut req) })
            .map_err(at(SetInterface))?;
        if self.offload {
            let features = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            check(unsafe { libc::ioctl(tun.0, libc::TUNSETOFFLOAD, features as libc::c_ulong) })
                .map_err(at(Offload))?;
        }

        // SAFETY: socket(2) with constant arguments.
        let ctl =
            check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
                .map_err(at(ControlSocket))?;
        let ctl = RawGuard(ctl);

        let mut req = self.ifreq();
        req.ifr_ifru.ifru_mtu = self.mtu as libc::c_int;
        self.ioctl(ctl.0, libc::SIOCSIFMTU, &mut req)
            .map_err(at(Mtu))?;

        let mut req = self.ifreq();
        req.ifr_ifru.ifru_addr = sockaddr_v4(self.v4.0);
        self.ioctl(ctl.0, libc::SIOCSIFADDR, &mut req)
            .map_err(at(Ipv4Address))?;

        let mut req = self.ifreq();
        req.ifr_ifru.ifru_netmask = sockaddr_v4(v4_netmask(self.v4.1));
        self.ioctl(ctl.0, libc::SIOCSIFNETMASK, &mut req)
            .map_err(at(Ipv4Netmask))?;

        // Routes need the device up (ENETDOWN otherwise). IFF_RUNNING follows the carrier,
        // which a TUN has while its descriptor is open.
        let mut req = self.ifreq();
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(ctl.0, libc::SIOCSIFFLAGS, &mut req)
            .map_err(at(Up))?;

        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            // The kernel only reads the name (strncpy_from_user).
            rt_dev: self.name.as_ptr().cast_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads an rtentry on this frame whose rt_dev points into `self`.
        check(unsafe { libc::ioctl(ctl.0, libc::SIOCADDRT, &mut route) }).map_err(at(Ipv4Route))?;

        if let Some((addr, prefix)) = self.v6 {
            let mut req = self.ifreq();
            self.ioctl(ctl.0, libc::SIOCGIFINDEX, &mut req)
                .map_err(at(InterfaceIndex))?;
            // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
            let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
            // SAFETY: socket(2) with constant arguments.
            let ctl6 = check(unsafe {
                libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
            })
            .map_err(at(Ipv6Socket))?;
            let ctl6 = RawGuard(ctl6);
            let mut req6 = libc::in6_ifreq {
                ifr6_addr: in6(addr),
                ifr6_prefixlen: u32::from(prefix),
                ifr6_ifindex: ifindex,
            };
            // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads an in6_ifreq on this frame.
            check(unsafe { libc::ioctl(ctl6.0, libc::SIOCSIFADDR, &mut req6) })
                .map_err(at(Ipv6Address))?;
            let mut route6 = In6RtMsg {
                rtmsg_dst: in6(Ipv6Addr::UNSPECIFIED),
                rtmsg_src: in6(Ipv6Addr::UNSPECIFIED),
                rtmsg_gateway: in6(Ipv6Addr::UNSPECIFIED),
                rtmsg_type: 0,
                rtmsg_dst_len: 0,
                rtmsg_src_len: 0,
                // 0 picks the kernel's default metric for user routes (1024).
                rtmsg_metric: 0,
                rtmsg_info: 0,
                rtmsg_flags: u32::from(libc::RTF_UP),
                rtmsg_ifindex: ifindex,
            };
            // SAFETY: SIOCADDRT on an AF_INET6 socket reads an in6_rtmsg on this frame.
            check(unsafe { libc::ioctl(ctl6.0, libc::SIOCADDRT, &mut route6) })
                .map_err(at(Ipv6Route))?;
        }

        // A sock_diag socket answers for the namespace it was created in: made here, it lets
        // mirrord list this namespace's listening sockets without ever entering it (which a
        // rootless mirrord could not).
        // SAFETY: socket(2) with constant arguments.
        let diag = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        })
        .map_err(at(ListenerSocket))?;
        let diag = RawGuard(diag);

        self.send_fd(tun.0).map_err(at(SendDescriptor))?;
        self.send_fd(diag.0).map_err(at(SendDescriptor))
    }

    /// An ifreq naming the interface. Async-signal-safe.
    fn ifreq(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = self.name;
        req
    }

    fn ioctl(&self, fd: RawFd, request: libc::Ioctl, req: &mut libc::ifreq) -> Result<(), i32> {
        // SAFETY: the socket ioctls used here read (and SIOCGIFINDEX writes) one ifreq.
        check(unsafe { libc::ioctl(fd, request, req as *mut libc::ifreq) }).map(drop)
    }

    /// Sends `fd` with SCM_RIGHTS over the plan's socket. Async-signal-safe: the message and
    /// its control buffer live on this frame.
    fn send_fd(&self, fd: RawFd) -> Result<(), i32> {
        let mut byte = [b'T'];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: byte.len(),
        };
        let mut control = FdCmsg {
            header: libc::cmsghdr {
                // SAFETY: CMSG_LEN is arithmetic on its argument.
                cmsg_len: unsafe { libc::CMSG_LEN(size_of::<libc::c_int>() as u32) } as _,
                cmsg_level: libc::SOL_SOCKET,
                cmsg_type: libc::SCM_RIGHTS,
            },
            fd,
            _pad: 0,
        };
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&raw mut control).cast();
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as _;
        // SAFETY: sendmsg(2) reads the message, iovec and control buffer on this frame.
        let sent = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 { Err(errno()) } else { Ok(()) }
    }
}

impl TunReceiver {
    /// Takes the TUN descriptor the child sent before exec. Never waits: once spawn returned
    /// the descriptor is either queued on the socket or was never sent (the child failed).
    pub fn receive(&self) -> Result<OwnedFd, TunError> {
        self.receive_fd()
    }

    /// Takes the `NETLINK_SOCK_DIAG` socket the child created in its network namespace, sent
    /// right after the TUN descriptor (call [`TunReceiver::receive`] first).
    pub fn receive_listener_socket(&self) -> Result<OwnedFd, TunError> {
        self.receive_fd()
    }

    fn receive_fd(&self) -> Result<OwnedFd, TunError> {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: byte.len(),
        };
        // SAFETY: plain data; all-zero is a valid value.
        let mut control: FdCmsg = unsafe { std::mem::zeroed() };
        // SAFETY: plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&raw mut control).cast();
        msg.msg_controllen = size_of::<FdCmsg>() as _;
        // SAFETY: recvmsg(2) writes into the buffers above, all sized in `msg`.
        let n = unsafe {
            libc::recvmsg(
                self.socket.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return Err(TunError::NotReceived(
                if err.kind() == io::ErrorKind::WouldBlock {
                    io::Error::other("nothing was sent")
                } else {
                    err
                },
            ));
        }
        // SAFETY: CMSG_FIRSTHDR only looks inside the control buffer `msg` describes.
        let header = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: CMSG_LEN is arithmetic on its argument.
        let expected_len = unsafe { libc::CMSG_LEN(size_of::<libc::c_int>() as u32) } as usize;
        // SAFETY: a non-null header returned by CMSG_FIRSTHDR lies inside `control`.
        let valid = !header.is_null()
            && unsafe {
                (*header).cmsg_level == libc::SOL_SOCKET
                    && (*header).cmsg_type == libc::SCM_RIGHTS
                    && (*header).cmsg_len as usize == expected_len
            };
        if !valid || msg.msg_flags & libc::MSG_CTRUNC != 0 {
            // A truncated message may still have installed a descriptor: take it to close it.
            if valid {
                // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
                drop(unsafe { OwnedFd::from_raw_fd(control.fd) });
            }
            return Err(TunError::NotReceived(io::Error::other(if n == 0 {
                "the socket was closed"
            } else {
                "the message carried no descriptor"
            })));
        }
        // SAFETY: the kernel installed this descriptor for us (close-on-exec); nobody else owns
        // it.
        Ok(unsafe { OwnedFd::from_raw_fd(control.fd) })
    }
}

fn interface_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TunError> {
    let invalid = |reason| TunError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    // Same rules as the kernel's dev_valid_name.
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(invalid("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("reserved"));
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(invalid("contains NUL, '/', ':' or whitespace"));
    }
    if name.contains('%') {
        // The kernel would pick a name from a pattern, and the routes would then name the
        // wrong (or no) interface.
        return Err(invalid("contains '%'"));
    }
    let mut buf = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in buf.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_checked_before_the_fork() {
        let v4 = (Ipv4Addr::new(10, 213, 0, 2), 32);
        assert!(TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, v4, None).is_ok());
        for name in [
            "",
            "a-name-of-16-byt",
            "a/b",
            "a b",
            ".",
            "..",
            "tun%d",
            "a:b",
        ] {
            assert!(
                matches!(
                    TunPlan::new(name, DEFAULT_MTU, v4, None),
                    Err(TunError::InvalidName { .. })
                ),
                "{name:?}"
            );
        }
        assert!(TunPlan::new("fifteen-bytes-x", DEFAULT_MTU, v4, None).is_ok());
        for mtu in [0, 67, 65536] {
            assert!(matches!(
                TunPlan::new(DEFAULT_NAME, mtu, v4, None),
                Err(TunError::InvalidMtu { .. })
            ));
        }
        assert!(TunPlan::new(DEFAULT_NAME, 68, v4, None).is_ok());
        assert!(TunPlan::new(DEFAULT_NAME, 65535, v4, None).is_ok());
        let v6 = Some((Ipv6Addr::LOCALHOST, 128));
        assert!(matches!(
            TunPlan::new(DEFAULT_NAME, 1279, v4, v6),
            Err(TunError::InvalidMtu { .. })
        ));
        assert!(matches!(
            TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, (v4.0, 33), None),
            Err(TunError::InvalidPrefix { .. })
        ));
        assert!(matches!(
            TunPlan::new(
                DEFAULT_NAME,
                DEFAULT_MTU,
                v4,
                Some((Ipv6Addr::LOCALHOST, 129))
            ),
            Err(TunError::InvalidPrefix { .. })
        ));
    }

    #[test]
    fn netmasks_follow_the_prefix() {
        assert_eq!(v4_netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(v4_netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(v4_netmask(0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn child_errors_name_the_step_and_a_denied_tun_says_how_to_fix() {
        for step in TunStep::ALL {
            assert_eq!(TunStep::from_code(step.code()), Some(step));
        }
        assert_eq!(TunStep::from_code(0), None);
        let e = TunError::from_child(TunStep::Open, libc::EACCES);
        let msg = e.to_string();
        assert!(
            msg.starts_with("creating the TUN device (/dev/net/tun): Permission denied"),
            "{msg}"
        );
        assert!(msg.contains("chmod 0666 /dev/net/tun"), "{msg}");
        assert!(!msg.contains('\n'));
        let e = TunError::from_child(TunStep::Ipv6Route, libc::EEXIST);
        assert!(matches!(e, TunError::Setup { .. }));
        assert!(
            e.to_string().starts_with("adding the IPv6 default route"),
            "{e}"
        );
    }

    #[test]
    fn receive_fails_cleanly_when_nothing_was_sent() {
        let v4 = (Ipv4Addr::new(10, 213, 0, 2), 32);
        let (plan, receiver) = TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, v4, None).expect("plan");
        let e = receiver.receive().expect_err("nothing was sent");
        assert!(e.to_string().contains("nothing was sent"), "{e}");
        let (_, receiver) = TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, v4, None).expect("plan");
        drop(plan);
        assert!(receiver.receive().is_err());
    }

    #[test]
    fn a_descriptor_travels_over_the_socket_pair() {
        let v4 = (Ipv4Addr::new(10, 213, 0, 2), 32);
        let (plan, receiver) = TunPlan::new(DEFAULT_NAME, DEFAULT_MTU, v4, None).expect("plan");
        let mut pipe = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(
            unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: just created, owned by nothing else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        plan.send_fd(tx.as_raw_fd()).expect("send");
        drop(tx);
        let got = receiver.receive().expect("receive");
        // SAFETY: fcntl only queries the descriptor.
        let flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let mut file = std::fs::File::from(got);
        std::io::Write::write_all(&mut file, b"x").expect("write through the received fd");
        drop(file);
        let mut byte = [0u8; 1];
        // SAFETY: read(2) into a stack buffer.
        assert_eq!(
            unsafe { libc::read(rx.as_raw_fd(), byte.as_mut_ptr().cast(), 1) },
            1
        );
        assert_eq!(&byte, b"x");
    }
}
