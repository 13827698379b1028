//! The core driven with no runtime and no clock: packets in, every decision taken at once, the
//! stack's own packets out. Fuzzing feeds it arbitrary bytes as the app's packets (see
//! `fuzz/`), so whatever they hold it must only ever drop, refuse or answer them.

use std::task::{Context, Poll};

use smoltcp::iface::SocketHandle;
use smoltcp::time::Instant;

use crate::Config;
use crate::core::{Core, CoreEvent, Decision};

/// What the stack did with a run of packets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Packets the stack wrote towards the app.
    pub sent: Vec<Vec<u8>>,
    /// TCP connections it accepted (every third SYN; the others are refused or unreachable).
    pub accepted: usize,
    /// UDP flows it saw open.
    pub udp_flows: usize,
    /// Bytes the app sent on accepted connections that came out of the stack in order.
    pub received: usize,
}

/// Feeds `packets` to a fresh stack as if the app had sent them, 10 ms apart. New TCP
/// connections are accepted, refused and answered as unreachable in turn; every accepted one
/// is read, written to and shut down; every UDP flow is answered once. Returns what came out.
pub fn replay(packets: impl IntoIterator<Item = Vec<u8>>) -> Replayed {
    let config = Config {
        // Small buffers that start smaller still, so that a busy connection's grow within a
        // budget a few can spend (and the ring moves its contents when they wrap).
        tcp_rx_buffer: 64 * 1024,
        tcp_tx_buffer: 64 * 1024,
        tcp_first_buffer: 4 * 1024,
        tcp_buffer_budget: 192 * 1024,
        random_seed: 1,
        ..Config::default()
    };
    let mut core = Core::new(config, Instant::from_millis(0));
    let mut out = Replayed::default();
    let mut accepted: Vec<SocketHandle> = Vec::new();
    let mut decisions = 0usize;
    let mut buf = [0u8; 2048];
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut now = Instant::from_millis(0);
    for packet in packets {
        now += smoltcp::time::Duration::from_millis(10);
        core.ingest(now, packet);
        core.poll(now);
        while let Some(event) = core.pop_event() {
            match event {
                CoreEvent::NewTcp(key) => {
                    let decision = match decisions % 3 {
                        0 => Decision::Accept,
                        1 => Decision::Refuse,
                        _ => Decision::Unreachable,
                    };
                    decisions += 1;
                    // A SYN the stack cannot listen for is refused; that is an answer too.
                    if let Ok(Some(handle)) = core.decide(now, key, decision) {
                        accepted.push(handle);
                        out.accepted += 1;
                    }
                }
                CoreEvent::NewUdp { key, id } => {
                    out.udp_flows += 1;
                    while let Poll::Ready(Some(_)) = core.udp_poll_recv(key, id, &mut cx) {}
                    // A flow that closed meanwhile has no one to answer.
                    let _ = core.udp_send(now, key, id, b"answer");
                }
            }
        }
        for &handle in &accepted {
            while let Poll::Ready(Ok(n @ 1..)) = core.tcp_poll_read(handle, &mut cx, &mut buf) {
                out.received += n;
            }
            let _ = core.tcp_poll_write(handle, &mut cx, b"reply");
        }
        core.poll(now);
        out.sent.extend(core.drain_transmit());
    }
    for handle in accepted {
        core.tcp_shutdown(handle);
        core.tcp_release(handle, false);
    }
    now += smoltcp::time::Duration::from_millis(10);
    core.poll(now);
    core.close_all();
    core.poll(now);
    out.sent.extend(core.drain_transmit());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tests::syn;

    #[test]
    fn a_syn_is_answered_and_garbage_is_dropped() {
        let app = ([10, 0, 0, 2], 40000).into();
        let server = ([10, 0, 0, 9], 80).into();
        let out = replay([
            syn(app, server, 100),
            vec![0x45, 0, 0],
            Vec::new(),
            vec![0x60; 39],
        ]);
        assert_eq!(out.accepted, 1);
        assert!(!out.sent.is_empty(), "the SYN got a SYN-ACK");
    }
}
