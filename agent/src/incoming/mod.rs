//! Incoming traffic: the agent takes over subscribed ports of the target — a redirect in the
//! target's network namespace to a listener of its own — and hands each connection to the
//! session that stole it, or passes it to the original app while copying the client's bytes to
//! the sessions that mirror it. It must never let a mirror slow or break the real connection
//! (a copy that cannot keep up is dropped), and never leave its redirect behind (see [`guard`]).
//!
//! One redirect per port for the whole agent, however many sessions want the port: who gets a
//! connection is the [`registry`]'s decision, taken when the connection arrives.
//! Other agents may redirect the same port in the same target (every session that starts its own
//! agent): the agents stand in line by their tables' [`Place`], and what one passes through goes
//! on to the next (see [`nft`]).
//!
//! What the agent writes to the connections it relays (to clients and to the original app)
//! goes out in one burst per round of its runtime, as an event-loop proxy sends (see `batch.rs`).

mod batch;
pub mod guard;
pub mod nft;
pub mod orig_dst;
pub mod registry;
mod tee;

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use mirrord_link::streams::Streams;
use mirrord_protocol::incoming::{IncomingConnection, IncomingMode, Subscription};
use mirrord_protocol::{RemoteError, StreamTarget};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::server::AgentOut;
use batch::{BatchedStream, Batcher};
use guard::Guard;
use mirrord_http_filter::{Filter, LocalRoute};
use nft::{Cause, Nft, Owner, Place, Plan};
use registry::{Registry, Route, SessionId};
use tee::Tee;

/// How long the agent's own connection to the original app may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent needs to redirect: whose table, which `nft`, and the guard to arm.
pub struct Redirect {
    pub owner: Owner,
    pub nft: Nft,
    pub guard: Guard,
}

/// A session's streams, as the agent opens incoming streams on them.
pub type SessionStreams = Streams<AgentOut>;

pub struct Incoming {
    redirect: Redirect,
    /// Serialises changes of the redirect, so the table always matches the registry.
    installed: tokio::sync::Mutex<Installed>,
    /// Read by every arriving connection; changed only under `installed`.
    registry: Mutex<Registry<Arc<Filter>>>,
    sessions: Mutex<HashMap<SessionId, Weak<SessionStreams>>>,
    next_session: AtomicU64,
    /// The mark of the agent's connections to the original app: its installed place's.
    mark: AtomicU32,
    /// Every relayed connection's writes, sent together at the end of each round.
    batcher: Arc<Batcher>,
}

struct Installed {
    /// The agent's listener port, once bound.
    listen_port: Option<u16>,
    /// What the table redirects now.
    plan: Plan,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps: a panic while holding them leaves nothing half-updated worth refusing over.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Incoming {
    pub fn new(redirect: Redirect) -> Arc<Incoming> {
        Arc::new(Incoming {
            redirect,
            installed: tokio::sync::Mutex::new(Installed {
                listen_port: None,
                plan: Plan {
                    ports: BTreeSet::new(),
                    stolen: BTreeSet::new(),
                    place: Place::FIRST,
                },
            }),
            registry: Mutex::new(Registry::default()),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            mark: AtomicU32::new(Place::FIRST.mark()),
            batcher: Batcher::new(),
        })
    }

    /// Registers a session, so connections can be handed to it.
    pub fn open_session(&self, streams: &Arc<SessionStreams>) -> SessionId {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        lock(&self.sessions).insert(id, Arc::downgrade(streams));
        id
    }

    /// Drops a session that ended, with its subscriptions; ports nobody wants any more are
    /// given back.
    pub async fn end_session(self: &Arc<Self>, session: SessionId) {
        lock(&self.sessions).remove(&session);
        let mut installed = self.installed.lock().await;
        lock(&self.registry).end_session(session);
        if let Err(cause) = self.sync(&mut installed).await {
            warn!("cannot give the ports of an ended session back: {cause}");
        }
    }

    /// Subscribes `session` to a port: the redirect is in place when this returns `Ok`.
    ///
    /// Other agents may redirect in the same target (each session of its own, as every
    /// Kubernetes session is): the agent then takes the place before theirs, so the port's
    /// connections come to it first, and what it passes through goes on to them. A whole steal
    /// of a port another agent steals whole is refused unless it overrides, as within one
    /// agent.
    pub async fn subscribe(
        self: &Arc<Self>,
        session: SessionId,
        subscription: Subscription,
    ) -> Result<(), RemoteError> {
        let port = subscription.port;
        let filter = match &subscription.filter {
            Some(filter) => Some(Arc::new(Filter::compile(filter).map_err(|error| {
                RemoteError {
                    errno: libc::EINVAL,
                    message: error.to_string(),
                }
            })?)),
            None => None,
        };
        let mut installed = self.installed.lock().await;
        let others = self.other_agents().await;
        let steals_whole = subscription.mode == IncomingMode::Steal && filter.is_none();
        let stealer = others
            .iter()
            .find(|(_, plan)| plan.stolen.contains(&port))
            .filter(|_| steals_whole && !subscription.override_steal);
        if let Some((pid, _)) = stealer {
            return Err(RemoteError {
                errno: libc::EBUSY,
                message: format!(
                    "port {port} is already stolen by another session (its agent is pid {pid}); set override_steal (on_concurrent_steal = \"override\") to take it over"
                ),
            });
        }
        let place = match others.iter().map(|(_, plan)| plan.place).max() {
            Some(top) if top >= installed.plan.place => top.above().ok_or(RemoteError {
                errno: libc::EBUSY,
                message: format!(
                    "cannot redirect port {port} in the target: too many mirrord agents already redirect there"
                ),
            })?,
            _ => installed.plan.place,
        };
        let mut registry = lock(&self.registry).clone();
        let displaced = registry
            .subscribe(
                session,
                port,
                subscription.mode,
                filter,
                subscription.override_steal,
            )
            .map_err(|conflict| RemoteError {
                errno: libc::EBUSY,
                message: conflict.to_string(),
            })?;
        let cannot = |cause: &dyn std::fmt::Display, errno| RemoteError {
            errno,
            message: format!("cannot redirect port {port} in the target: {cause}"),
        };
        if installed.listen_port.is_none() {
            let listener = listen().map_err(|error| {
                cannot(
                    &format!("cannot listen for redirected connections: {error}"),
                    error.raw_os_error().unwrap_or(libc::EIO),
                )
            })?;
            let listen_port = listener
                .local_addr()
                .map(|a| a.port())
                .map_err(|error| cannot(&error, error.raw_os_error().unwrap_or(libc::EIO)))?;
            installed.listen_port = Some(listen_port);
            tokio::spawn(self.clone().accept_loop(listener, listen_port));
        }
        self.install(&mut installed, plan_of(&registry, place))
            .await
            .map_err(|cause| cannot(&cause, cause.errno()))?;
        *lock(&self.registry) = registry;
        if let Some(displaced) = displaced {
            info!(port, displaced, by = session, "steal overridden");
        }
        Ok(())
    }

    /// Gives a port back; the session's connections already handed over go on.
    pub async fn unsubscribe(
        self: &Arc<Self>,
        session: SessionId,
        port: u16,
    ) -> Result<(), RemoteError> {
        let mut installed = self.installed.lock().await;
        lock(&self.registry).unsubscribe(session, port);
        self.sync(&mut installed)
            .await
            .map_err(|cause| RemoteError {
                errno: cause.errno(),
                message: format!(
                    "cannot remove the redirect of port {port} in the target: {cause}"
                ),
            })
    }

    /// Removes the tables of agents that died without their guard (a whole container killed
    /// at once). Best effort: without nft or NET_ADMIN nothing can be redirected either, and
    /// the first subscription says so.
    pub async fn sweep_stale(&self) {
        let listing = match self.redirect.nft.list_tables().await {
            Ok(listing) => listing,
            Err(cause) => return debug!("no sweep of stale tables: {cause}"),
        };
        for (table, owner) in self.other_tables(&listing) {
            if owner.is_dead(self.redirect.owner.pid_ns) {
                match self.redirect.nft.apply(&nft::delete(&table)).await {
                    Ok(()) => info!(table, "removed a dead agent's table"),
                    Err(cause) => warn!(table, "cannot remove a dead agent's table: {cause}"),
                }
            }
        }
    }

    /// The other live agents that redirect in this target, with what their tables redirect.
    /// A table whose owner is in another pid namespace counts as live (it cannot be judged
    /// from here). Best effort: a listing that fails is the redirect's own error to report,
    /// later.
    async fn other_agents(&self) -> Vec<(u32, Plan)> {
        let Ok(listing) = self.redirect.nft.list_tables().await else {
            return Vec::new();
        };
        let mut others = Vec::new();
        for (table, owner) in self.other_tables(&listing) {
            if owner.is_dead(self.redirect.owner.pid_ns) {
                continue;
            }
            // Gone between the two listings: nothing to share.
            if let Ok(rules) = self.redirect.nft.list_table(&table).await {
                others.push((owner.pid, nft::read_plan(&rules)));
            }
        }
        others
    }

    /// The tables of other agents (named after an owner, not ours) in `nft list tables` output.
    fn other_tables(&self, listing: &str) -> Vec<(String, Owner)> {
        let ours = self.redirect.owner.table();
        nft::our_tables(listing)
            .into_iter()
            .filter(|table| *table != ours)
            .filter_map(|table| Owner::parse(&table).map(|owner| (table, owner)))
            .collect()
    }

    /// Makes the table redirect what the registry wants now.
    async fn sync(&self, installed: &mut Installed) -> Result<(), Cause> {
        let plan = plan_of(&lock(&self.registry), installed.plan.place);
        self.install(installed, plan).await
    }

    async fn install(&self, installed: &mut Installed, plan: Plan) -> Result<(), Cause> {
        if plan == installed.plan {
            return Ok(());
        }
        let Some(listen_port) = installed.listen_port else {
            // Nothing was ever installed, so nothing is to remove either.
            return Ok(());
        };
        self.redirect
            .guard
            .arm()
            .map_err(|error| Cause::Other(format!("cannot arm the guard: {error}")))?;
        let table = self.redirect.owner.table();
        self.redirect
            .nft
            .apply(&nft::ruleset(&table, &plan, listen_port))
            .await?;
        debug!(table, ?plan, listen_port, "redirect installed");
        // Only now: until the table skips the new place's mark, a connection with it would
        // come back to this agent.
        self.mark.store(plan.place.mark(), Ordering::Relaxed);
        installed.plan = plan;
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, listen_port: u16) {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: back off rather than spin.
                    warn!("accepting a redirected connection failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let peer = unmapped(peer);
            let destination = match orig_dst::original_destination(client.as_fd(), peer) {
                Ok(destination) => unmapped(destination),
                Err(error) => {
                    warn!(%peer, "a redirected connection without original destination: {error}");
                    continue;
                }
            };
            if destination.port() == listen_port {
                // Someone connected to the agent's listener itself, not a redirected port:
                // passing it "through" would connect the listener to itself.
                debug!(%peer, %destination, "connection to the agent's listener refused");
                continue;
            }
            let route = lock(&self.registry).route(destination.port());
            let incoming = self.clone();
            tokio::spawn(async move {
                incoming.dispatch(route, client, peer, destination).await;
            });
        }
    }

    /// The one place a redirected connection is sent where the registry said.
    async fn dispatch(
        &self,
        route: Route<Arc<Filter>>,
        client: TcpStream,
        peer: SocketAddr,
        destination: SocketAddr,
    ) {
        let _ = client.set_nodelay(true);
        let connection = |mode| IncomingConnection {
            port: destination.port(),
            peer,
            destination,
            mode,
        };
        let (route, mirrors, filtered) = match route {
            Route::Steal { session, mirrors } => (Some(session), mirrors, Vec::new()),
            Route::PassThrough { mirrors } => (None, mirrors, Vec::new()),
            Route::Filtered { filters, mirrors } => (None, mirrors, filters),
        };
        let copies = mirrors
            .into_iter()
            .filter_map(|session| self.streams(session))
            .map(|streams| tee::mirror(streams, connection(IncomingMode::Mirror)))
            .collect();
        let client = Tee::new(self.batcher.stream(client), copies);
        if !filtered.is_empty() {
            let routes = filtered
                .into_iter()
                .filter_map(|(session, mode, filter)| {
                    let streams = self.streams(session)?;
                    let connection = connection(mode);
                    Some(LocalRoute::new(filter, mode, move || {
                        open_local(streams.clone(), connection.clone())
                    }))
                })
                .collect();
            let (mark, batcher) = (self.mark(), self.batcher.clone());
            let served = mirrord_http_filter::serve_routes(
                client,
                routes,
                move || connect_original(destination, mark, batcher.clone()),
                mirrord_http_filter::Options::default(),
            )
            .await;
            if let Err(error) = served {
                debug!(%peer, %destination, "filtered connection ended: {error}");
            }
            return;
        }
        if let Some(streams) = route.and_then(|session| self.streams(session)) {
            match streams
                .open(StreamTarget::Incoming(connection(IncomingMode::Steal)))
                .await
            {
                Ok(rx) => streams.pipe(client, rx).await,
                // The client sees its connection closed, as if the app had refused it.
                Err(error) => {
                    debug!(%peer, %destination, "the session did not take a stolen connection: {error}")
                }
            }
            return;
        }
        match connect_original(destination, self.mark(), self.batcher.clone()).await {
            Ok(mut original) => {
                let mut client = client;
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut original).await
                {
                    debug!(%peer, %destination, "passed-through connection ended: {error}");
                }
            }
            Err(error) => {
                warn!(%peer, %destination, "cannot pass a connection through to the original app: {error}")
            }
        }
    }

    fn mark(&self) -> u32 {
        self.mark.load(Ordering::Relaxed)
    }

    fn streams(&self, session: SessionId) -> Option<Arc<SessionStreams>> {
        lock(&self.sessions).get(&session).and_then(Weak::upgrade)
    }
}

/// The agent's listener for redirected connections: dual-stack where the target has IPv6,
/// else IPv4 only.
fn listen() -> std::io::Result<TcpListener> {
    let dual = TcpSocket::new_v6().and_then(|socket| {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)?;
        socket.bind((Ipv6Addr::UNSPECIFIED, 0).into())?;
        Ok(socket)
    });
    let socket = match dual {
        Ok(socket) => socket,
        Err(error) => {
            debug!("no IPv6 listener ({error}); IPv4 only");
            let socket = TcpSocket::new_v4()?;
            socket.bind((std::net::Ipv4Addr::UNSPECIFIED, 0).into())?;
            socket
        }
    };
    socket.listen(1024)
}

/// How far the HTTP router may write ahead of a session's stream to the local app.
const LOCAL_PIPE_BUFFER: usize = 64 * 1024;

/// A connection to a session's local app for the HTTP router: an incoming stream the session
/// connects to its app, piped to the end handed back.
async fn open_local(
    streams: Arc<SessionStreams>,
    connection: IncomingConnection,
) -> std::io::Result<tokio::io::DuplexStream> {
    let rx = streams
        .open(StreamTarget::Incoming(connection))
        .await
        .map_err(|error| match error {
            mirrord_link::streams::OpenError::Remote(error) => std::io::Error::new(
                std::io::Error::from_raw_os_error(error.errno).kind(),
                error.message,
            ),
            mirrord_link::streams::OpenError::Lost => {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "the session is gone")
            }
        })?;
    let (near, far) = tokio::io::duplex(LOCAL_PIPE_BUFFER);
    tokio::spawn(streams.pipe(far, rx));
    Ok(near)
}

/// What the table should redirect for `registry`, at `place`.
fn plan_of<F: Clone>(registry: &Registry<F>, place: Place) -> Plan {
    Plan {
        ports: registry.ports(),
        stolen: registry.stolen_whole(),
        place,
    }
}

/// Connects to the original app with `mark`, so the redirect lets the connection through (to
/// the app, or to the next agent in line).
async fn connect_original(
    destination: SocketAddr,
    mark: u32,
    batcher: Arc<Batcher>,
) -> std::io::Result<BatchedStream> {
    let socket = match destination {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(destination))
        .await
        .map_err(|_| std::io::Error::from_raw_os_error(libc::ETIMEDOUT))??;
    let _ = stream.set_nodelay(true);
    Ok(batcher.stream(stream))
}

/// An IPv4 address as itself rather than v4-mapped, as a dual-stack listener reports it.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Both ends of a loopback TCP connection, for the tests of this module and its children.
#[cfg(test)]
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap());
    let (near, accepted) = tokio::join!(near, listener.accept());
    (near.unwrap(), accepted.unwrap().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_are_plain_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:80".parse().unwrap();
        assert_eq!(unmapped(mapped), "10.0.0.2:80".parse().unwrap());
        let v6: SocketAddr = "[fd00::2]:80".parse().unwrap();
        assert_eq!(unmapped(v6), v6);
    }
}
