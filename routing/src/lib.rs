//! The routing policy of the launched process's outgoing flows: [`rules`] decides, per flow,
//! whether it leaves through the agent, from this machine or to this machine's loopback, and
//! [`SharedRules`] lets the flows being routed and the DNS stub that teaches the rules names'
//! addresses use one set of rules. No I/O, no clock, no TUN: the tunnel carries packets, this
//! crate only decides.

pub mod rules;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rules::{Protocol, Route, Rules};

/// One set of rules, shared by the flow router and the DNS stub.
#[derive(Clone)]
pub struct SharedRules(Arc<RwLock<Rules>>);

impl SharedRules {
    pub fn new(rules: Rules) -> SharedRules {
        SharedRules(Arc::new(RwLock::new(rules)))
    }

    pub fn route(&self, protocol: Protocol, dst: SocketAddr) -> Route {
        self.read().route(protocol, dst)
    }

    /// Teaches the rules what `name` now resolves to (see [`Rules::learn`]).
    pub fn learn(&self, name: &str, addresses: &[IpAddr]) {
        self.write().learn(name, addresses);
    }

    /// The names the rules mention (see [`Rules::names`]).
    pub fn names(&self) -> Vec<String> {
        self.read().names()
    }

    fn read(&self) -> RwLockReadGuard<'_, Rules> {
        // A panic while learning leaves the rules as they were before it: still usable.
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Rules> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}
