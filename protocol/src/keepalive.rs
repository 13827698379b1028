//! Liveness of the peer: decides when to ping and when a silent peer counts as dead. It takes
//! every instant as an argument and never reads a clock, sleeps or sends; the caller polls it at
//! [`Keepalive::next_deadline`] and acts on the returned [`KeepaliveAction`].

use std::time::{Duration, Instant};

/// Silence after which a side pings its peer.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// A peer silent this long after a ping is dead.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveAction {
    /// Nothing to do before [`Keepalive::next_deadline`].
    Idle,
    /// Send `Ping { nonce }` to the peer now.
    SendPing { nonce: u64 },
    /// Nothing at all arrived within the timeout after a ping; the connection is dead. Sticky.
    PeerDead,
}

#[derive(Debug, Clone)]
pub struct Keepalive {
    interval: Duration,
    timeout: Duration,
    last_received: Instant,
    /// When the unanswered ping was sent. Any received frame clears it: a peer busy sending data
    /// is alive even if its pong is queued behind that data.
    ping_sent: Option<Instant>,
    ping_nonce: u64,
    dead: bool,
}

/// Longer periods are clamped to this so `Instant + period` cannot overflow (and panic).
const MAX_PERIOD: Duration = Duration::from_secs(365 * 24 * 60 * 60);

impl Keepalive {
    pub fn new(interval: Duration, timeout: Duration, now: Instant) -> Self {
        Self {
            interval: interval.min(MAX_PERIOD),
            timeout: timeout.min(MAX_PERIOD),
            last_received: now,
            ping_sent: None,
            ping_nonce: 0,
            dead: false,
        }
    }

    /// Any frame from the peer proves it alive.
    pub fn on_receive(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        self.last_received = self.last_received.max(now);
        self.ping_sent = None;
    }

    /// A pong is a frame like any other; a stale nonce (answer to an earlier ping) still proves
    /// the peer alive, so the nonce is not needed to decide.
    pub fn on_pong(&mut self, _nonce: u64, now: Instant) {
        self.on_receive(now);
    }

    pub fn poll(&mut self, now: Instant) -> KeepaliveAction {
        if self.dead {
            return KeepaliveAction::PeerDead;
        }
        match self.ping_sent {
            Some(sent) if now >= sent + self.timeout => {
                self.dead = true;
                KeepaliveAction::PeerDead
            }
            Some(_) => KeepaliveAction::Idle,
            None if now >= self.last_received + self.interval => {
                self.ping_sent = Some(now);
                self.ping_nonce = self.ping_nonce.wrapping_add(1);
                KeepaliveAction::SendPing {
                    nonce: self.ping_nonce,
                }
            }
            None => KeepaliveAction::Idle,
        }
    }

    /// When `poll` should be called next (possibly in the past: poll now).
    pub fn next_deadline(&self) -> Instant {
        match self.ping_sent {
            Some(sent) => sent + self.timeout,
            None => self.last_received + self.interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);
    const TIMEOUT: Duration = Duration::from_secs(30);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn ping_after_interval_of_silence() {
        let t0 = Instant::now();
        let mut ka = Keepalive::new(INTERVAL, TIMEOUT, t0);
        assert_eq!(ka.next_deadline(), t0 + INTERVAL);
        assert_eq!(ka.poll(t0 + secs(9)), KeepaliveAction::Idle);
        let KeepaliveAction::SendPing { nonce } = ka.poll(t0 + INTERVAL) else {
            panic!("expected a ping after the interval");
        };
        // One ping outstanding at a time.
        assert_eq!(ka.poll(t0 + secs(11)), KeepaliveAction::Idle);
        assert_eq!(ka.next_deadline(), t0 + INTERVAL + TIMEOUT);
        ka.on_pong(nonce, t0 + secs(12));
        assert_eq!(ka.next_deadline(), t0 + secs(22));
    }

    #[test]
    fn pong_resets_and_pings_continue() {
        let t0 = Instant::now();
        let mut ka = Keepalive::new(INTERVAL, TIMEOUT, t0);
        let mut now = t0;
        let mut nonces = Vec::new();
        for _ in 0..5 {
            now += INTERVAL;
            let KeepaliveAction::SendPing { nonce } = ka.poll(now) else {
                panic!("expected a ping");
            };
            nonces.push(nonce);
            now += secs(1);
            ka.on_pong(nonce, now);
            assert_eq!(ka.poll(now), KeepaliveAction::Idle);
        }
        nonces.dedup();
        assert_eq!(nonces.len(), 5, "each ping has a fresh nonce");
    }

    #[test]
    fn peer_dead_after_timeout_and_sticky() {
        let t0 = Instant::now();
        let mut ka = Keepalive::new(INTERVAL, TIMEOUT, t0);
        assert!(matches!(
            ka.poll(t0 + INTERVAL),
            KeepaliveAction::SendPing { .. }
        ));
        let dead_at = t0 + INTERVAL + TIMEOUT;
        assert_eq!(ka.poll(dead_at - secs(1)), KeepaliveAction::Idle);
        assert_eq!(ka.poll(dead_at), KeepaliveAction::PeerDead);
        ka.on_receive(dead_at + secs(1));
        assert_eq!(ka.poll(dead_at + secs(1)), KeepaliveAction::PeerDead);
    }

    #[test]
    fn traffic_counts_as_liveness() {
        let t0 = Instant::now();
        let mut ka = Keepalive::new(INTERVAL, TIMEOUT, t0);
        // Steady traffic: never a ping.
        for s in (1..100).step_by(5) {
            ka.on_receive(t0 + secs(s));
            assert_eq!(ka.poll(t0 + secs(s)), KeepaliveAction::Idle);
        }
        // A ping goes out, no pong, but data keeps arriving: not dead.
        let t1 = t0 + secs(200);
        assert!(matches!(ka.poll(t1), KeepaliveAction::SendPing { .. }));
        ka.on_receive(t1 + TIMEOUT - secs(1));
        assert_ne!(ka.poll(t1 + TIMEOUT), KeepaliveAction::PeerDead);
        assert_ne!(ka.poll(t1 + TIMEOUT + secs(5)), KeepaliveAction::PeerDead);
    }

    #[test]
    fn late_poll_still_pings_before_declaring_death() {
        // A caller that wakes up late (suspended laptop) must give the peer a chance first.
        let t0 = Instant::now();
        let mut ka = Keepalive::new(INTERVAL, TIMEOUT, t0);
        let late = t0 + secs(1000);
        assert!(matches!(ka.poll(late), KeepaliveAction::SendPing { .. }));
        assert_eq!(ka.poll(late + secs(1)), KeepaliveAction::Idle);
    }
}
