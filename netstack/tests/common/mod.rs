//! A fake "app": a second smoltcp interface wired back-to-back to a NetStack's packet
//! channels, so real TCP clients can connect to arbitrary destinations through the stack.
//! Shared by the test binaries and the throughput example; each uses a subset.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use mirrord_netstack::{PacketSink, PacketSource};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpProtocol};
use tokio::sync::{Notify, watch};

pub const APP_V4: &str = "10.0.0.2";
pub const APP_V6: &str = "fd00::2";

struct Dev {
    /// stack --packets--> app
    rx: VecDeque<Vec<u8>>,
    /// app --packets--> stack
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for Dev {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

struct State {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Dev,
    next_port: u16,
    /// ICMP / ICMPv6 packets the stack sent to the app.
    icmp: Vec<Vec<u8>>,
}

struct Shared {
    state: Mutex<State>,
    /// clients --"sockets changed"--> app driver
    kick: Notify,
    /// app driver --"polled"--> clients (a counter, so no wake-up is lost)
    polled: watch::Sender<u64>,
    start: tokio::time::Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }
}

#[derive(Clone)]
pub struct App {
    shared: Arc<Shared>,
}

fn is_icmp(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.get(9) == Some(&u8::from(IpProtocol::Icmp)),
        Some(6) => p.get(6) == Some(&u8::from(IpProtocol::Icmpv6)),
        _ => false,
    }
}

impl App {
    /// Starts the app's interface on the current runtime, wired to a stack's channels.
    pub fn spawn(sink: PacketSink, mut source: PacketSource, mtu: usize) -> App {
        let mut dev = Dev {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
        };
        let start = tokio::time::Instant::now();
        let mut iface = Interface::new(
            IfaceConfig::new(HardwareAddress::Ip),
            &mut dev,
            Instant::from_micros(0),
        );
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(10, 0, 0, 2), 24)).unwrap();
            a.push(IpCidr::new(IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 2), 64))
                .unwrap();
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                iface,
                sockets: SocketSet::new(Vec::new()),
                dev,
                next_port: 40000,
                icmp: Vec::new(),
            }),
            kick: Notify::new(),
            polled: watch::channel(0).0,
            start,
        });
        let driver = shared.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                let delay = {
                    let mut st = driver.lock();
                    let st = &mut *st;
                    let now = driver.now();
                    st.iface.poll(now, &mut st.dev, &mut st.sockets);
                    for p in st.dev.tx.drain(..) {
                        if sink.send(p).is_err() {
                            return;
                        }
                    }
                    st.iface.poll_delay(now, &st.sockets)
                };
                driver.polled.send_modify(|n| *n += 1);
                let sleep = async {
                    match delay {
                        Some(d) => tokio::time::sleep(d.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    n = source.recv_many(&mut batch, 256) => {
                        if n == 0 {
                            return;
                        }
                        let mut st = driver.lock();
                        for p in batch.drain(..) {
                            if is_icmp(&p) {
                                st.icmp.push(p.clone());
                            }
                            st.dev.rx.push_back(p);
                        }
                    }
                    _ = driver.kick.notified() => {}
                    _ = sleep => {}
                }
            }
        });
        App { shared }
    }

    /// Opens a TCP connection from the app (its own address of the right family) to `dst`.
    pub fn connect(&self, dst: SocketAddr, buffer: usize) -> Conn {
        let handle = {
            let mut st = self.shared.lock();
            let st = &mut *st;
            let port = st.next_port;
            st.next_port += 1;
            let local: IpAddr = match dst {
                SocketAddr::V4(_) => APP_V4.parse().unwrap(),
                SocketAddr::V6(_) => APP_V6.parse().unwrap(),
            };
            // The receive window stays unscaled, as a kernel's effectively is: smoltcp rounds a
            // scaled window down and so shrinks its right edge, which Linux never does, and then
            // the stack (smoltcp too) can strand bytes it sent past the edge without a
            // retransmit timer, a stall no real app could cause.
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0u8; buffer.min(usize::from(u16::MAX))]),
                tcp::SocketBuffer::new(vec![0u8; buffer]),
            );
            socket.set_ack_delay(None);
            socket.set_nagle_enabled(false);
            socket
                .connect(
                    st.iface.context(),
                    IpEndpoint::new(dst.ip().into(), dst.port()),
                    IpEndpoint::new(local.into(), port),
                )
                .unwrap();
            st.sockets.add(socket)
        };
        self.shared.kick.notify_one();
        Conn {
            app: self.clone(),
            handle,
        }
    }

    /// ICMP packets the stack has sent to the app so far.
    pub fn icmp_received(&self) -> Vec<Vec<u8>> {
        self.shared.lock().icmp.clone()
    }

    /// Waits until `check` on the app state returns Some.
    async fn wait<T>(&self, mut check: impl FnMut(&mut State) -> Option<T>) -> T {
        let mut polled = self.shared.polled.subscribe();
        loop {
            polled.mark_unchanged();
            if let Some(v) = check(&mut self.shared.lock()) {
                self.shared.kick.notify_one();
                return v;
            }
            // The driver outlives every test; a closed channel would mean it panicked.
            polled.changed().await.unwrap();
        }
    }
}

/// One TCP connection from the fake app.
pub struct Conn {
    app: App,
    handle: SocketHandle,
}

impl Conn {
    fn with<T>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> T) -> T {
        let r = f(self
            .app
            .shared
            .lock()
            .sockets
            .get_mut::<tcp::Socket>(self.handle));
        self.app.shared.kick.notify_one();
        r
    }

    pub fn state(&self) -> tcp::State {
        self.with(|s| s.state())
    }

    /// Waits for the handshake; Err(state) if the connection died instead.
    pub async fn established(&self) -> Result<(), tcp::State> {
        let h = self.handle;
        self.app
            .wait(|st| match st.sockets.get::<tcp::Socket>(h).state() {
                tcp::State::SynSent | tcp::State::SynReceived => None,
                tcp::State::Established => Some(Ok(())),
                other => Some(Err(other)),
            })
            .await
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        let h = self.handle;
        while !data.is_empty() {
            let n = self
                .app
                .wait(|st| {
                    let s = st.sockets.get_mut::<tcp::Socket>(h);
                    match s.send_slice(data) {
                        Ok(0) => None,
                        Ok(n) => Some(Ok(n)),
                        Err(_) => Some(Err(io::Error::from(io::ErrorKind::BrokenPipe))),
                    }
                })
                .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Reads what is available (waiting for at least one byte); Ok(empty) at EOF, Err on RST.
    pub async fn read_some(&self, max: usize) -> io::Result<Vec<u8>> {
        let h = self.handle;
        self.app
            .wait(|st| {
                let s = st.sockets.get_mut::<tcp::Socket>(h);
                let mut buf = vec![0u8; max];
                match s.recv_slice(&mut buf) {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some(Ok(buf))
                    }
                    Err(tcp::RecvError::Finished) => Some(Ok(Vec::new())),
                    Err(tcp::RecvError::InvalidState) => match s.state() {
                        tcp::State::SynSent | tcp::State::SynReceived => None,
                        _ => Some(Err(io::Error::from(io::ErrorKind::ConnectionReset))),
                    },
                }
            })
            .await
    }

    pub async fn read_exact(&self, len: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let chunk = self.read_some(len - out.len()).await?;
            if chunk.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    pub async fn read_to_end(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read_some(1 << 16).await?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// SHUT_WR: queue a FIN.
    pub fn shutdown(&self) {
        self.with(|s| s.close());
    }

    /// Sends an RST.
    pub fn abort(&self) {
        self.with(|s| s.abort());
    }
}

/// Deterministic test data: a byte pattern that differs per connection and per offset.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
