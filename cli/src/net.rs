//! The launched process's outgoing network: a TUN device in its own network namespace, the
//! netstack terminating every flow it opens, and a routing decision per flow — through the
//! agent from the target's network, from this machine's network, or to this machine's
//! loopback. It never changes the host's own network configuration. (Incoming connections
//! use the same device: see [`Served`] and [`crate::incoming`].)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use ipnet::IpNet;
use mirrord_link::streams::Datagrams;
use mirrord_netstack::{Event, NetStack, NewTcp, Originator, PacketDevice, TxChecksum, UdpFlow};
use mirrord_protocol::TargetInfo;
use mirrord_routing::SharedRules;
use mirrord_routing::rules::{OutgoingFilter, Protocol, Route, Rules, RulesConfig};
use mirrord_tunnel::{TunDevice, TunPlan, TunReceiver};
use tokio::net::{TcpStream, UdpSocket};

use crate::client::{AgentClient, ClientError};
use crate::dns::{DnsStub, NameFilter, TargetResolvConf};
use crate::incoming::AppAddresses;

/// The address inside the launched process's namespace that reaches this machine's
/// `127.0.0.1` (a database on the laptop stays reachable). From the benchmarking range
/// 198.18.0.0/15, which no cluster hands out.
pub const HOST_LOOPBACK: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 254);

/// The name of [`HOST_LOOPBACK`] in the command's `/etc/hosts`.
pub const HOST_LOOPBACK_NAME: &str = "host.mirrord.internal";

/// The launched process's own address when the target reports no IPv4 address.
const FALLBACK_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

/// Set to `0` to create the TUN device without offload (a diagnostic switch: with it, the
/// kernel computes every checksum and cuts TCP sends to the MTU, as before offload).
pub const OFFLOAD_ENV: &str = "MIRRORD_TUN_OFFLOAD";

fn offload_wanted(setting: Option<&std::ffi::OsStr>) -> bool {
    setting.is_none_or(|value| value != "0")
}

/// What the user asked of the outgoing network.
#[derive(Debug, Clone)]
pub struct NetSettings {
    /// False with `--no-outgoing`: every flow stays on this machine's network.
    pub outgoing: bool,
    /// False with `--no-udp`: UDP stays on this machine's network.
    pub udp: bool,
    /// More remote ranges (`--cidr`), besides the target's own subnets.
    pub cidrs: Vec<IpNet>,
    /// `feature.network.outgoing.filter`.
    pub filter: Option<OutgoingFilter>,
}

impl Default for NetSettings {
    fn default() -> Self {
        Self {
            outgoing: true,
            udp: true,
            cidrs: Vec::new(),
            filter: None,
        }
    }
}

/// The network half of a session: the plan goes to the launcher, the rest serves the device
/// once the command runs.
pub struct Network {
    receiver: TunReceiver,
    /// The launched process's own addresses (the target's).
    app: AppAddresses,
    /// Shared with the DNS stub, which teaches it the addresses of the filter's names.
    rules: SharedRules,
    dns: Option<Arc<DnsStub>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid outgoing filter: {0}")]
    Rules(#[from] mirrord_routing::rules::RuleError),
    #[error("{0}")]
    Tunnel(#[from] mirrord_tunnel::TunError),
    #[error("cannot serve the network tunnel: {0}")]
    Device(std::io::Error),
    #[error("cannot start the network stack: {0}")]
    Stack(mirrord_netstack::Error),
}

/// Plans the tunnel for `info`'s target. None (after one warning line) when this user cannot
/// create TUN devices, so the session still runs, with only `lo`.
pub fn prepare(
    info: &TargetInfo,
    settings: &NetSettings,
) -> Result<Option<(TunPlan, Network)>, NetError> {
    // SAFETY: access(2) on a constant NUL-terminated path.
    if unsafe { libc::access(c"/dev/net/tun".as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        crate::output::warn(format!(
            "/dev/net/tun is not readable and writable for you ({}); the command runs without the target's network (as root: chmod 0666 /dev/net/tun)",
            std::io::Error::last_os_error()
        ));
        return Ok(None);
    }
    let v4 = info
        .addresses
        .iter()
        .find_map(|&(ip, prefix)| match ip {
            IpAddr::V4(v4) => Some((v4, prefix)),
            IpAddr::V6(_) => None,
        })
        .unwrap_or((FALLBACK_V4, 32));
    let v6 = info.addresses.iter().find_map(|&(ip, prefix)| match ip {
        IpAddr::V6(v6) => Some((v6, prefix)),
        IpAddr::V4(_) => None,
    });
    let mut remote_cidrs: Vec<IpNet> = info
        .addresses
        .iter()
        .filter_map(|&(ip, prefix)| IpNet::new(ip, prefix).ok().map(|net| net.trunc()))
        .collect();
    remote_cidrs.extend(settings.cidrs.iter().copied());
    let rules = Rules::new(RulesConfig {
        remote_cidrs,
        filter: settings.filter.clone(),
        host_loopback: vec![IpAddr::V4(HOST_LOOPBACK)],
        udp: settings.udp,
        outgoing: settings.outgoing,
    })?;
    // The device carries the target's address itself (/32): every non-loopback destination is
    // routed into it anyway, and the netstack decides per flow.
    let (plan, receiver) = TunPlan::new(
        mirrord_tunnel::DEFAULT_NAME,
        mirrord_tunnel::DEFAULT_MTU,
        (v4.0, 32),
        v6.map(|(ip, _)| (ip, 128)),
    )?;
    let plan = plan.with_offload(offload_wanted(std::env::var_os(OFFLOAD_ENV).as_deref()));
    Ok(Some((
        plan,
        Network {
            receiver,
            app: AppAddresses {
                v4: v4.0,
                v6: v6.map(|(ip, _)| ip),
            },
            rules: SharedRules::new(rules),
            dns: None,
        },
    )))
}

impl Network {
    /// Also serves the DNS stub on [`crate::dns::STUB_ADDR`]: names resolve through the agent
    /// as in the target, except those `filter` keeps on this machine.
    pub fn serve_dns(
        &mut self,
        client: Arc<AgentClient>,
        filter: Option<NameFilter>,
        conf: &TargetResolvConf,
    ) {
        self.dns = Some(Arc::new(DnsStub::new(
            client,
            filter,
            conf,
            self.rules.clone(),
        )));
    }

    /// Takes the device the command's setup created and serves it until this process exits.
    /// Returns what incoming traffic needs to reach the command.
    pub fn serve(self, client: Arc<AgentClient>) -> Result<Served, NetError> {
        let device = TunDevice::new(self.receiver.receive()?).map_err(NetError::Device)?;
        let listener_socket = self.receiver.receive_listener_socket()?;
        let config = mirrord_netstack::Config {
            mtu: mirrord_tunnel::DEFAULT_MTU as usize,
            // Packets come from the local kernel through the TUN: already checked, or (with
            // offload) carrying a checksum the kernel left for the device to complete.
            verify_rx_checksums: false,
            // With offload, TCP packets to the command need no checksum pass on either side.
            tcp_checksum_offload: device.offload(),
            ..mirrord_netstack::Config::default()
        };
        let (mut events, originator) =
            NetStack::spawn_on(config, Tun(device)).map_err(NetError::Stack)?;
        let (rules, dns) = (self.rules, self.dns);
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let (rules, client, dns) = (rules.clone(), client.clone(), dns.clone());
                tokio::spawn(async move {
                    match (event, dns) {
                        (Event::Tcp(new), Some(dns)) if is_stub(new.dst) => {
                            dns.serve_tcp(new).await
                        }
                        (Event::Udp(flow), Some(dns)) if is_stub(flow.dst) => {
                            dns.serve_udp(flow).await
                        }
                        (Event::Tcp(new), _) => tcp(new, &rules, &client).await,
                        (Event::Udp(flow), _) => udp(flow, &rules, &client).await,
                    }
                });
            }
        });
        Ok(Served {
            originator,
            listener_socket,
            app: self.app,
        })
    }
}

/// The netstack reads and writes the TUN device itself, in its own task.
struct Tun(TunDevice);

impl PacketDevice for Tun {
    async fn recv(&mut self, bufs: &mut [Vec<u8>]) -> std::io::Result<usize> {
        self.0.recv_batch(bufs).await
    }

    async fn send(&mut self, packet: &[u8], checksum: TxChecksum) -> std::io::Result<()> {
        match checksum {
            TxChecksum::Complete => self.0.send(packet).await,
            TxChecksum::Partial { start, offset } => {
                self.0.send_partial(packet, start, offset).await
            }
        }
    }
}

/// What [`Network::serve`] hands on for incoming traffic.
pub struct Served {
    /// Opens connections to the command through the netstack.
    pub originator: Originator,
    /// A `sock_diag` socket of the command's network namespace.
    pub listener_socket: OwnedFd,
    pub app: AppAddresses,
}

fn is_stub(dst: SocketAddr) -> bool {
    dst == SocketAddr::from((crate::dns::STUB_ADDR, crate::dns::STUB_PORT))
}

/// Where a local or host-loopback flow connects from this machine.
fn local_target(route: Route, dst: SocketAddr) -> SocketAddr {
    match route {
        Route::HostLoopback if dst.is_ipv4() => (Ipv4Addr::LOCALHOST, dst.port()).into(),
        Route::HostLoopback => (std::net::Ipv6Addr::LOCALHOST, dst.port()).into(),
        _ => dst,
    }
}

/// Connects the far side first, so the app's connect succeeds or fails as the real one did.
async fn tcp(new: NewTcp, rules: &SharedRules, client: &AgentClient) {
    let dst = new.dst;
    let route = rules.route(Protocol::Tcp, dst);
    tracing::debug!(src = %new.src, %dst, ?route, "new TCP flow");
    match route {
        Route::Remote => match client.connect_tcp(dst).await {
            Ok(remote) => match new.accept() {
                Ok(stream) => client.pipe(stream, remote).await,
                Err(error) => {
                    tracing::debug!(%error, "the app's connection vanished");
                    client.abandon(remote).await;
                }
            },
            Err(ClientError::Remote(error)) if error.errno == libc::ECONNREFUSED => new.refuse(),
            Err(error) => {
                warn_once_if_out_of_streams(&error);
                tracing::debug!(%dst, "remote connect failed: {error}");
                new.unreachable();
            }
        },
        Route::Local | Route::HostLoopback => {
            match TcpStream::connect(local_target(route, dst)).await {
                Ok(mut socket) => {
                    let _ = socket.set_nodelay(true);
                    if let Ok(mut stream) = new.accept() {
                        // Errors end the flow; dropping both sides resets what is left.
                        if tokio::io::copy_bidirectional(&mut stream, &mut socket)
                            .await
                            .is_err()
                        {
                            stream.abort();
                        }
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => new.refuse(),
                Err(error) => {
                    tracing::debug!(%dst, %error, "local connect failed");
                    new.unreachable();
                }
            }
        }
    }
}

/// The netstack's view of one UDP flow, as the agent link's datagram pipe wants it.
struct FlowDatagrams(UdpFlow);

impl Datagrams for FlowDatagrams {
    async fn recv(&mut self) -> Option<Vec<u8>> {
        self.0.recv().await
    }

    async fn send(&mut self, datagram: &[u8]) -> std::io::Result<()> {
        self.0.send(datagram).map_err(std::io::Error::other)
    }
}

async fn udp(flow: UdpFlow, rules: &SharedRules, client: &AgentClient) {
    let dst = flow.dst;
    let route = rules.route(Protocol::Udp, dst);
    tracing::debug!(src = %flow.src, %dst, ?route, "new UDP flow");
    match route {
        Route::Remote => match client.connect_udp(dst).await {
            Ok(remote) => client.pipe_datagrams(FlowDatagrams(flow), remote).await,
            Err(error) => {
                warn_once_if_out_of_streams(&error);
                tracing::debug!(%dst, "remote UDP failed: {error}");
            }
        },
        Route::Local | Route::HostLoopback => {
            let target = local_target(route, dst);
            let bind: SocketAddr = if target.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = match UdpSocket::bind(bind).await {
                Ok(socket) => socket,
                Err(error) => return tracing::debug!(%error, "local UDP bind failed"),
            };
            if let Err(error) = socket.connect(target).await {
                return tracing::debug!(%dst, %error, "local UDP connect failed");
            }
            relay(FlowDatagrams(flow), socket).await;
        }
    }
}

/// The agent refuses a new stream when the session has as many open as it serves one session
/// (or it is out of descriptors): the command then sees "no route to host" for every new
/// connection, so the reason is said once, at the default log level.
fn warn_once_if_out_of_streams(error: &ClientError) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let ClientError::Remote(remote) = error
        && remote.errno == libc::EMFILE
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            "the agent opens no more connections for this session ({}); new ones fail with \"no route to host\" until some of the command's close",
            remote.message
        );
    }
}

/// Datagrams both ways between two sockets until either ends.
async fn relay(mut app: impl Datagrams, mut far: impl Datagrams) {
    loop {
        tokio::select! {
            datagram = app.recv() => match datagram {
                Some(datagram) => { let _ = far.send(&datagram).await; }
                None => return,
            },
            datagram = far.recv() => match datagram {
                Some(datagram) => { let _ = app.send(&datagram).await; }
                None => return,
            },
        }
    }
}
