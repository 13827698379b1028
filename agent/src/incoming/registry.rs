//! Who wants which port: the agent's subscriptions of every session, and the one decision of
//! where a redirected connection goes. Pure: the redirect follows [`Registry::ports`], and the
//! connection is routed by [`Registry::route`]. It must never let two sessions steal the same
//! port whole unless the second asked to override.

use std::collections::{BTreeMap, BTreeSet};

use mirrord_protocol::incoming::IncomingMode;

/// One session of the agent (a CLI connection), numbered by the agent.
pub type SessionId = u64;

#[derive(Debug, Clone, PartialEq)]
struct Entry<F> {
    session: SessionId,
    mode: IncomingMode,
    filter: Option<F>,
}

impl<F> Entry<F> {
    fn steals_whole(&self) -> bool {
        self.mode == IncomingMode::Steal && self.filter.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    #[error(
        "port {port} is already stolen by another session; set override_steal (on_concurrent_steal = \"override\") to take it over"
    )]
    AlreadyStolen { port: u16 },
}

/// Where one redirected connection goes; `F` is a session's filter (the agent keeps them
/// compiled).
#[derive(Debug, Clone, PartialEq)]
pub enum Route<F> {
    /// To `session` whole; `mirrors` get a copy of the client's bytes.
    Steal {
        session: SessionId,
        mirrors: Vec<SessionId>,
    },
    /// Request by request, by these sessions' filters (the HTTP router's to decide); `mirrors`
    /// as above.
    Filtered {
        filters: Vec<(SessionId, IncomingMode, F)>,
        mirrors: Vec<SessionId>,
    },
    /// To the original app, as if nothing happened; `mirrors` get a copy (empty when nobody
    /// wants the port any more, after an unsubscribe raced the connection).
    PassThrough { mirrors: Vec<SessionId> },
}

#[derive(Debug, Clone)]
pub struct Registry<F> {
    ports: BTreeMap<u16, Vec<Entry<F>>>,
}

impl<F> Default for Registry<F> {
    fn default() -> Self {
        Registry {
            ports: BTreeMap::new(),
        }
    }
}

impl<F: Clone> Registry<F> {
    /// Adds or replaces `session`'s subscription of `port`, taking the requests `filter`
    /// matches (all of them without one). An unfiltered steal of a port that another session
    /// steals unfiltered is refused unless `override_steal`, which takes the port from that
    /// session; its subscription is dropped and it is returned.
    pub fn subscribe(
        &mut self,
        session: SessionId,
        port: u16,
        mode: IncomingMode,
        filter: Option<F>,
        override_steal: bool,
    ) -> Result<Option<SessionId>, Conflict> {
        let entry = Entry {
            session,
            mode,
            filter,
        };
        let entries = self.ports.entry(port).or_default();
        let holder = entries
            .iter()
            .find(|other| other.session != session && other.steals_whole())
            .map(|other| other.session);
        let displaced = match holder {
            Some(_) if entry.steals_whole() && !override_steal => {
                return Err(Conflict::AlreadyStolen { port });
            }
            Some(holder) if entry.steals_whole() => Some(holder),
            _ => None,
        };
        entries.retain(|other| other.session != session && Some(other.session) != displaced);
        entries.push(entry);
        Ok(displaced)
    }

    /// Drops `session`'s subscription of `port`; whether it had one.
    pub fn unsubscribe(&mut self, session: SessionId, port: u16) -> bool {
        let Some(entries) = self.ports.get_mut(&port) else {
            return false;
        };
        let before = entries.len();
        entries.retain(|entry| entry.session != session);
        let removed = entries.len() != before;
        if entries.is_empty() {
            self.ports.remove(&port);
        }
        removed
    }

    /// Drops every subscription of a session that ended.
    pub fn end_session(&mut self, session: SessionId) {
        let ports: Vec<u16> = self.ports.keys().copied().collect();
        for port in ports {
            self.unsubscribe(session, port);
        }
    }

    /// The ports someone wants redirected.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.ports.keys().copied().collect()
    }

    /// The ports a session steals whole.
    pub fn stolen_whole(&self) -> BTreeSet<u16> {
        self.ports
            .iter()
            .filter(|(_, entries)| entries.iter().any(Entry::steals_whole))
            .map(|(port, _)| *port)
            .collect()
    }

    /// Where a new connection to `port` goes. A whole steal wins over filters; mirrors always
    /// get their copy.
    pub fn route(&self, port: u16) -> Route<F> {
        let entries = self.ports.get(&port).map(Vec::as_slice).unwrap_or_default();
        let mirrors: Vec<SessionId> = entries
            .iter()
            .filter(|e| e.mode == IncomingMode::Mirror && e.filter.is_none())
            .map(|e| e.session)
            .collect();
        if let Some(stealer) = entries.iter().find(|e| e.steals_whole()) {
            return Route::Steal {
                session: stealer.session,
                mirrors,
            };
        }
        let filters: Vec<_> = entries
            .iter()
            .filter_map(|e| Some((e.session, e.mode, e.filter.clone()?)))
            .collect();
        if filters.is_empty() {
            Route::PassThrough { mirrors }
        } else {
            Route::Filtered { filters, mirrors }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrord_protocol::incoming::{HttpFilter, Subscription};

    /// Subscribes as the agent does for `subscription`, its filter kept as it came.
    fn add(
        registry: &mut Registry<HttpFilter>,
        session: SessionId,
        subscription: &Subscription,
    ) -> Result<Option<SessionId>, Conflict> {
        registry.subscribe(
            session,
            subscription.port,
            subscription.mode,
            subscription.filter.clone(),
            subscription.override_steal,
        )
    }

    fn sub(port: u16, mode: IncomingMode) -> Subscription {
        Subscription {
            port,
            mode,
            filter: None,
            override_steal: false,
        }
    }

    const STEAL: IncomingMode = IncomingMode::Steal;
    const MIRROR: IncomingMode = IncomingMode::Mirror;

    #[test]
    fn a_steal_takes_the_connection_and_mirrors_get_copies() {
        let mut registry = Registry::default();
        assert_eq!(add(&mut registry, 1, &sub(80, MIRROR)), Ok(None));
        assert_eq!(registry.route(80), Route::PassThrough { mirrors: vec![1] });
        assert_eq!(add(&mut registry, 2, &sub(80, STEAL)), Ok(None));
        assert_eq!(
            registry.route(80),
            Route::Steal {
                session: 2,
                mirrors: vec![1]
            }
        );
        assert_eq!(registry.route(81), Route::PassThrough { mirrors: vec![] });
        assert_eq!(registry.ports(), BTreeSet::from([80]));
        assert_eq!(registry.stolen_whole(), BTreeSet::from([80]));
        registry.unsubscribe(2, 80);
        assert!(
            registry.stolen_whole().is_empty(),
            "a mirror is not a steal"
        );
    }

    #[test]
    fn a_second_whole_steal_is_refused_unless_it_overrides() {
        let mut registry = Registry::default();
        add(&mut registry, 1, &sub(80, STEAL)).unwrap();
        let refused = add(&mut registry, 2, &sub(80, STEAL)).unwrap_err();
        assert_eq!(refused, Conflict::AlreadyStolen { port: 80 });
        assert!(!refused.to_string().contains('\n'));
        assert!(refused.to_string().starts_with("port 80 is already stolen"));
        // The refusal changed nothing.
        assert_eq!(
            registry.route(80),
            Route::Steal {
                session: 1,
                mirrors: vec![]
            }
        );
        // The same session re-subscribing replaces its own subscription.
        assert_eq!(add(&mut registry, 1, &sub(80, STEAL)), Ok(None));
        let overriding = Subscription {
            override_steal: true,
            ..sub(80, STEAL)
        };
        assert_eq!(add(&mut registry, 2, &overriding), Ok(Some(1)));
        assert_eq!(
            registry.route(80),
            Route::Steal {
                session: 2,
                mirrors: vec![]
            }
        );
        assert!(!registry.unsubscribe(1, 80), "session 1 lost the port");
    }

    #[test]
    fn filtered_subscriptions_do_not_conflict_with_a_whole_steal() {
        let mut registry = Registry::default();
        let filtered = Subscription {
            filter: Some(HttpFilter::Path("^/api".into())),
            ..sub(80, STEAL)
        };
        add(&mut registry, 1, &filtered).unwrap();
        assert_eq!(
            registry.route(80),
            Route::Filtered {
                filters: vec![(1, STEAL, HttpFilter::Path("^/api".into()))],
                mirrors: vec![]
            }
        );
        add(&mut registry, 2, &sub(80, STEAL)).unwrap();
        assert_eq!(
            registry.route(80),
            Route::Steal {
                session: 2,
                mirrors: vec![]
            }
        );
    }

    #[test]
    fn a_port_is_released_when_nobody_wants_it() {
        let mut registry = Registry::default();
        add(&mut registry, 1, &sub(80, MIRROR)).unwrap();
        add(&mut registry, 2, &sub(80, STEAL)).unwrap();
        add(&mut registry, 2, &sub(8080, STEAL)).unwrap();
        assert_eq!(registry.ports(), BTreeSet::from([80, 8080]));
        assert!(registry.unsubscribe(1, 80));
        assert!(!registry.unsubscribe(1, 80));
        assert_eq!(registry.ports(), BTreeSet::from([80, 8080]));
        registry.end_session(2);
        assert!(registry.ports().is_empty());
        assert_eq!(registry.route(80), Route::PassThrough { mirrors: vec![] });
    }
}
