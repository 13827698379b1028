//! The agent's network context: a tokio runtime whose every thread lives in the target's
//! network namespace, so sockets opened for the CLI are the pod's; it must never serve a
//! request from a thread that failed to enter that namespace.
//!
//! A network namespace belongs to a thread, and a socket keeps the namespace it was created in
//! for its whole life. So the runtime's workers (DNS lookups run there) and blocking-pool
//! threads join the namespace as they start. The thread that calls
//! `Runtime::block_on` is the caller's and keeps the caller's namespace: that is where the
//! agent's own listener for the CLI belongs, while work for the pod runs in spawned tasks.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sched::CloneFlags;

use crate::error::{Error, io_err};
use crate::target::Target;

/// Worker threads. One: the agent mostly shovels bytes between sockets, which one core keeps
/// up with, and every hand-over between tasks on different workers can cost a thread wake-up,
/// which on a VM with idle cores dominates small round trips. Measured with the CLI also at one
/// worker, against both at two: uncached lookups in bench/dns.sh 412 µs p50 against 509 µs,
/// and bench/network.sh's throughput 49% of a veth's against 36%.
const WORKERS: usize = 1;

/// A multi-thread runtime whose workers and blocking threads are in `target`'s network
/// namespace; for a target whose namespaces are the agent's own, an ordinary runtime.
pub fn runtime_in(target: &Target) -> Result<tokio::runtime::Runtime, Error> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(WORKERS)
        .thread_name("agent-net")
        .enable_all();
    if let Some(pid) = target.entered_pid() {
        let path = format!("/proc/{pid}/ns/net");
        let ns: Arc<OwnedFd> = Arc::new(File::open(&path).map_err(io_err("open", &path))?.into());
        probe(&ns).map_err(io_err("entering the network namespace", &path))?;
        builder.on_thread_start(move || {
            if let Err(e) = nix::sched::setns(&*ns, CloneFlags::CLONE_NEWNET) {
                // The hook can't return an error, and a thread left in the agent's namespace
                // would quietly connect, resolve and listen on the wrong network (on a node
                // that is the node's network). Dying loudly is the only safe answer; the probe
                // above makes this a "should never happen".
                eprintln!("mirrord-agent: fatal: a runtime thread could not enter {path}: {e}");
                std::process::abort();
            }
        });
    }
    builder
        .build()
        .map_err(io_err("starting the async runtime", ""))
}

/// Joins the namespace on a throwaway thread first, so a refusal (no CAP_SYS_ADMIN, a stale
/// fd) is returned as an error before any runtime thread depends on it.
/// The interface addresses of the calling thread's network namespace (on a runtime from
/// [`runtime_in`], the target's), loopback and link-local IPv6 left out, with prefix lengths.
pub fn addresses() -> io::Result<Vec<(std::net::IpAddr, u8)>> {
    use std::net::IpAddr;
    let mut addresses = Vec::new();
    for interface in nix::ifaddrs::getifaddrs()? {
        let (Some(address), Some(netmask)) = (interface.address, interface.netmask) else {
            continue;
        };
        let (ip, prefix): (IpAddr, u32) = if let (Some(a), Some(m)) =
            (address.as_sockaddr_in(), netmask.as_sockaddr_in())
        {
            (IpAddr::V4(a.ip()), u32::from(m.ip()).count_ones())
        } else if let (Some(a), Some(m)) = (address.as_sockaddr_in6(), netmask.as_sockaddr_in6()) {
            (IpAddr::V6(a.ip()), u128::from(m.ip()).count_ones())
        } else {
            continue;
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if !ip.is_loopback() && !link_local {
            addresses.push((ip, prefix as u8));
        }
    }
    Ok(addresses)
}

fn probe(ns: &Arc<OwnedFd>) -> io::Result<()> {
    let ns = Arc::clone(ns);
    std::thread::Builder::new()
        .name("netns-probe".into())
        .spawn(move || nix::sched::setns(&*ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from))?
        .join()
        .map_err(|_| io::Error::other("netns probe thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Namespaces;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener};
    use std::sync::mpsc;
    use tokio::io::AsyncReadExt;

    fn ns_inode(path: &str) -> String {
        std::fs::read_link(path)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Brings `lo` up in the calling thread's (fresh) network namespace.
    fn lo_up() -> io::Result<()> {
        // SAFETY: plain socket/ioctl calls on a zeroed, correctly sized ifreq.
        unsafe {
            let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if sock < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
                *dst = *src as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            let rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr);
            let err = io::Error::last_os_error();
            libc::close(sock);
            if rc < 0 { Err(err) } else { Ok(()) }
        }
    }

    /// A "pod": a thread of this test in a fresh network namespace (only `lo`), listening on
    /// 127.0.0.1 and greeting each client with a token. /proc/TID names that thread's
    /// namespaces. Dropping it unblocks and joins the thread; the namespace dies with it.
    struct Pod {
        tid: u32,
        port: u16,
        stop: Option<mpsc::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    const TOKEN: &[u8] = b"hello from the pod netns";

    impl Pod {
        fn start() -> Pod {
            let (ready_tx, ready_rx) = mpsc::channel();
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let setup = nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| lo_up())
                    .and_then(|()| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)));
                let listener = match setup {
                    Ok(l) => l,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let port = listener.local_addr().map(|a| a.port());
                let tid = nix::unistd::gettid().as_raw() as u32;
                let _ = ready_tx.send(port.map(|p| (tid, p)));
                let _ = listener.set_nonblocking(true);
                // Serve until told to stop; polling keeps the shutdown simple.
                while stop_rx.try_recv() == Err(mpsc::TryRecvError::Empty) {
                    match listener.accept() {
                        Ok((mut s, _)) => drop(s.write_all(TOKEN)),
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
            });
            let (tid, port) = ready_rx.recv().unwrap().unwrap();
            Pod {
                tid,
                port,
                stop: Some(stop_tx),
                thread: Some(thread),
            }
        }
    }

    impl Drop for Pod {
        fn drop(&mut self) {
            drop(self.stop.take());
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn runtime_threads_live_in_the_targets_network() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let pod = Pod::start();
        let target = Target::open(Some(pod.tid), Namespaces::Target).unwrap();
        let rt = runtime_in(&target).unwrap();
        let port = pod.port;
        let pod_ns = ns_inode(&format!("/proc/{}/ns/net", pod.tid));
        let (greeting, worker_ns, blocking) = rt.block_on(async move {
            let spawned = tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await?;
                io::Result::Ok((buf, ns_inode("/proc/thread-self/ns/net")))
            });
            let blocking = tokio::task::spawn_blocking(move || {
                let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf)?;
                io::Result::Ok(buf)
            });
            let (buf, ns) = spawned.await.unwrap().unwrap();
            (buf, ns, blocking.await.unwrap().unwrap())
        });
        assert_eq!(greeting, TOKEN);
        assert_eq!(blocking, TOKEN);
        assert_eq!(worker_ns, pod_ns);
        // The same port in the test's own namespace is not the pod's listener.
        let host = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map(|mut s| {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        });
        assert!(host.map_or(true, |buf| buf != TOKEN));
        drop(rt);
        drop(pod);
    }

    #[test]
    fn no_pid_is_an_ordinary_runtime() {
        let rt = runtime_in(&Target::open(None, Namespaces::Target).unwrap()).unwrap();
        let own = ns_inode("/proc/thread-self/ns/net");
        let seen = rt
            .block_on(async { tokio::spawn(async { ns_inode("/proc/thread-self/ns/net") }).await });
        assert_eq!(seen.unwrap(), own);
    }
}
