//! Incoming traffic on the CLI side: which of the launched process's listening ports are
//! subscribed at the agent and how, and the delivery of every connection the agent hands over
//! to the local app, from the client's real address. It never opens a port on this machine:
//! connections reach the app only through the netstack, inside the app's own namespace.
//!
//! The decisions are pure ([`IncomingSettings`]: config and flags into a [`Subscription`] per
//! local port); [`start`] is the async shell that follows the listeners, talks to the agent and
//! pipes connections.
//!
//! Choices:
//! - A port is subscribed when the app starts listening on it (seen within [`POLL_INTERVAL`]),
//!   and unsubscribed when it stops. A subscription the agent refuses ends the session (the
//!   command is stopped, exit 125), since the user asked for traffic that will not come; the
//!   refusal can only happen then, not at startup, because the ports are not known before.
//! - Exception: a plain mirror (the default, no filter) that the agent cannot provide at all
//!   (`EOPNOTSUPP`: agents of this protocol before incoming was built, or a node without
//!   nftables) gets one warning line and the session goes on without incoming traffic. A steal
//!   or a filter the user asked for is never dropped silently: its refusal ends the session.
//! - Sockets bound to loopback only are never subscribed: a delivered connection arrives at the
//!   process's own (pod) address, where such a socket does not listen.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mirrord_netstack::Originator;
use mirrord_protocol::incoming::{HttpFilter, IncomingConnection, IncomingMode, Subscription};
use mirrord_protocol::{RemoteError, Request, Response};
use tokio::sync::{mpsc, watch};

use crate::client::{AgentClient, ClientError, IncomingStream, lock};
use crate::config::{
    ConcurrentSteal, HttpFilterConfig, IncomingConfig, IncomingFeature, IncomingModeName,
    InnerFilter,
};
use crate::listeners::{self, DiagSocket};

/// How often the launched namespace's listening sockets are listed. A client that connects
/// within this time after the app started listening reaches the original app instead.
pub const POLL_INTERVAL: Duration = Duration::from_millis(150);

/// How long the app may take to accept a delivered connection before the client's connection
/// is refused.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the user asked of incoming traffic, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingSettings {
    /// `None`: incoming traffic is off, nothing is ever subscribed.
    pub mode: Option<IncomingMode>,
    pub filter: Option<HttpFilter>,
    /// The remote ports the filter applies to; `None`: all of them.
    pub filter_ports: Option<BTreeSet<u16>>,
    /// Local listening port → the target's port it takes.
    pub mapping: BTreeMap<u16, u16>,
    /// Only these remote ports; `None`: every port.
    pub ports: Option<BTreeSet<u16>>,
    /// Never these remote ports.
    pub ignore_ports: BTreeSet<u16>,
    pub override_steal: bool,
}

/// A bad `feature.network.incoming` value, named by its key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SettingsError(String);

/// The command-line flags about incoming traffic.
#[derive(Debug, Default, Clone)]
pub struct IncomingFlags {
    pub steal: bool,
    pub off: bool,
    /// `-p LOCAL:REMOTE`, in order.
    pub port_mapping: Vec<(u16, u16)>,
}

const KEY: &str = "feature.network.incoming";

impl IncomingSettings {
    /// Flags win over the file: `--no-incoming` over everything, `--steal` over the mode,
    /// `-p` over `port_mapping` entries of the same local port.
    pub fn new(
        config: &IncomingFeature,
        flags: &IncomingFlags,
    ) -> Result<IncomingSettings, SettingsError> {
        let empty = IncomingConfig::default();
        let (mode, detail) = match config {
            IncomingFeature::Mode(mode) => (*mode, &empty),
            IncomingFeature::Detailed(detail) => {
                (detail.mode.unwrap_or(IncomingModeName::Mirror), &**detail)
            }
        };
        let mode = match (flags.off, flags.steal, mode) {
            (true, _, _) => None,
            (false, true, _) => Some(IncomingMode::Steal),
            (false, false, IncomingModeName::Mirror) => Some(IncomingMode::Mirror),
            (false, false, IncomingModeName::Steal) => Some(IncomingMode::Steal),
            (false, false, IncomingModeName::Off) => None,
        };
        let (filter, filter_ports) = match &detail.http_filter {
            Some(http) => (
                http_filter(http)?,
                http.ports.as_ref().map(|p| p.iter().copied().collect()),
            ),
            None => (None, None),
        };
        let mut mapping = BTreeMap::new();
        for &(local, remote) in detail.port_mapping.iter().chain(&flags.port_mapping) {
            mapping.insert(local, remote);
        }
        Ok(IncomingSettings {
            mode,
            filter,
            filter_ports,
            mapping,
            ports: detail.ports.as_ref().map(|p| p.iter().copied().collect()),
            ignore_ports: detail.ignore_ports.iter().copied().collect(),
            override_steal: detail.on_concurrent_steal == Some(ConcurrentSteal::Override),
        })
    }

    /// The target's port a local listening port takes, if it is taken at all.
    pub fn remote_port(&self, local: u16) -> Option<u16> {
        self.mode?;
        let remote = self.mapping.get(&local).copied().unwrap_or(local);
        if self.ignore_ports.contains(&remote) {
            return None;
        }
        if let Some(ports) = &self.ports
            && !ports.contains(&remote)
        {
            return None;
        }
        Some(remote)
    }

    /// What to ask the agent for when the app listens on `local`. With a filter limited to
    /// some ports, another port is taken whole only when `ports` names it (as upstream does:
    /// a filter is there to leave the rest of the traffic alone).
    pub fn subscription(&self, local: u16) -> Option<Subscription> {
        let mode = self.mode?;
        let port = self.remote_port(local)?;
        let filter = match (&self.filter, &self.filter_ports) {
            (Some(filter), Some(ports)) if ports.contains(&port) => Some(filter.clone()),
            (Some(_), Some(_)) if self.ports.as_ref().is_some_and(|p| p.contains(&port)) => None,
            (Some(_), Some(_)) => return None,
            (filter, None) => filter.clone(),
            // `http_filter.ports` without a filter: nothing to filter.
            (None, Some(_)) => None,
        };
        Some(Subscription {
            port,
            mode,
            filter,
            override_steal: self.override_steal,
        })
    }
}

/// Checks a pattern as the agent will compile it (the `regex` crate, case-insensitive).
fn pattern(key: &str, text: &str) -> Result<String, SettingsError> {
    match regex::RegexBuilder::new(text)
        .case_insensitive(true)
        .build()
    {
        Ok(_) => Ok(text.to_owned()),
        Err(error) => {
            // The syntax error spans several lines (the pattern, a caret, the reason); keep
            // the reason.
            let text = error.to_string();
            let reason = text
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("error: "))
                .unwrap_or(text.lines().last().unwrap_or_default())
                .to_owned();
            Err(SettingsError(format!(
                "{key} is not a valid regular expression: {reason}"
            )))
        }
    }
}

fn inner(key: &str, entries: &[InnerFilter]) -> Result<Vec<HttpFilter>, SettingsError> {
    if entries.is_empty() {
        return Err(SettingsError(format!("{key} cannot be an empty list")));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| match entry {
            InnerFilter {
                header: Some(p),
                path: None,
                method: None,
            } => Ok(HttpFilter::Header(pattern(
                &format!("{key}[{i}].header"),
                p,
            )?)),
            InnerFilter {
                header: None,
                path: Some(p),
                method: None,
            } => Ok(HttpFilter::Path(pattern(&format!("{key}[{i}].path"), p)?)),
            InnerFilter {
                header: None,
                path: None,
                method: Some(p),
            } => Ok(HttpFilter::Method(pattern(
                &format!("{key}[{i}].method"),
                p,
            )?)),
            _ => Err(SettingsError(format!(
                "{key}[{i}] takes exactly one of \"header\", \"path\" or \"method\""
            ))),
        })
        .collect()
}

fn http_filter(http: &HttpFilterConfig) -> Result<Option<HttpFilter>, SettingsError> {
    let key = format!("{KEY}.http_filter");
    let mut filters = Vec::new();
    if let Some(p) = &http.header_filter {
        filters.push(HttpFilter::Header(pattern(
            &format!("{key}.header_filter"),
            p,
        )?));
    }
    if let Some(p) = &http.path_filter {
        filters.push(HttpFilter::Path(pattern(&format!("{key}.path_filter"), p)?));
    }
    if let Some(p) = &http.method_filter {
        filters.push(HttpFilter::Method(pattern(
            &format!("{key}.method_filter"),
            p,
        )?));
    }
    if let Some(all) = &http.all_of {
        filters.push(HttpFilter::AllOf(inner(&format!("{key}.all_of"), all)?));
    }
    if let Some(any) = &http.any_of {
        filters.push(HttpFilter::AnyOf(inner(&format!("{key}.any_of"), any)?));
    }
    if filters.len() > 1 {
        return Err(SettingsError(format!(
            "{key} takes one of header_filter, path_filter, method_filter, all_of or any_of \
             (combine them with all_of)"
        )));
    }
    Ok(filters.pop())
}

/// Parses `-p LOCAL:REMOTE`.
pub fn parse_port_mapping(text: &str) -> Result<(u16, u16), String> {
    let parsed = text
        .split_once(':')
        .and_then(|(local, remote)| Some((local.parse().ok()?, remote.parse().ok()?)));
    match parsed {
        Some((local, remote)) if local != 0 && remote != 0 => Ok((local, remote)),
        _ => Err(format!(
            "expected LOCAL:REMOTE, two ports from 1 to 65535, got `{text}`"
        )),
    }
}

/// Where a connection from the target's own address or from loopback is delivered from: the
/// launched process has the target's address itself, and the kernel drops a packet that arrives
/// from its own address, or from loopback on another interface, as a martian. The IPv4 dummy
/// address (RFC 7600), meant for a host with no address of its own.
const STAND_IN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 8);
/// Its IPv6 counterpart: an address of a unique-local prefix of our own (`mrdrd`).
const STAND_IN_V6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x7264, 0x7264, 0, 0, 0, 0, 8);

/// The launched process's own addresses, where delivered connections arrive.
#[derive(Debug, Clone, Copy)]
pub struct AppAddresses {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

impl AppAddresses {
    /// The app's address for a connection from `peer` (same family), at `port`.
    fn for_peer(&self, peer: SocketAddr, port: u16) -> Option<SocketAddr> {
        match peer.ip() {
            IpAddr::V4(_) => Some((self.v4, port).into()),
            IpAddr::V6(_) => self.v6.map(|v6| (v6, port).into()),
        }
    }

    /// The address a connection from `peer` is delivered from: `peer` itself, unless it is
    /// the target's own address (a client in the pod, or another session's agent passing a
    /// connection on), which is the app's own here too, or a loopback address (a mesh sidecar
    /// passing on what it received, as Istio's does from 127.0.0.6).
    fn source_for(&self, peer: SocketAddr) -> SocketAddr {
        let ip = match peer.ip() {
            IpAddr::V4(v4) if v4 == self.v4 || v4.is_loopback() => IpAddr::V4(STAND_IN_V4),
            IpAddr::V6(v6) if Some(v6) == self.v6 || v6.is_loopback() => IpAddr::V6(STAND_IN_V6),
            ip => ip,
        };
        SocketAddr::new(ip, peer.port())
    }
}

/// The running incoming side of a session.
pub struct Incoming {
    /// follower --why the session must end--> session
    failed_rx: watch::Receiver<Option<String>>,
}

impl Incoming {
    /// Resolves when a subscription was refused, with the line to end the session with.
    pub async fn failed(&self) -> String {
        let mut failed_rx = self.failed_rx.clone();
        match failed_rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The follower ended without a failure: never resolve.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Starts following the app's listeners (through `diag`, a socket of its namespace) and
/// delivering the agent's connections through `originator`.
pub fn start(
    client: Arc<AgentClient>,
    settings: IncomingSettings,
    diag: DiagSocket,
    originator: Originator,
    app: AppAddresses,
) -> Incoming {
    let (failed_tx, failed_rx) = watch::channel(None);
    // remote port → local port, for delivery.
    let routes = Arc::new(Mutex::new(BTreeMap::new()));
    if let Some(streams) = client.take_incoming() {
        tokio::spawn(deliver_all(
            client.clone(),
            streams,
            routes.clone(),
            originator,
            app,
        ));
    }
    tokio::spawn(follow(client, settings, diag, routes, failed_tx));
    Incoming { failed_rx }
}

/// The local ports with a reachable listener, from one listing.
fn local_ports(listening: &BTreeSet<SocketAddr>) -> BTreeSet<u16> {
    listening
        .iter()
        .filter(|addr| listeners::reachable(**addr))
        .map(SocketAddr::port)
        .collect()
}

/// Lists the namespace's listeners every [`POLL_INTERVAL`] on a thread of its own (the dump is
/// a blocking syscall), until the receiver is gone or the socket fails.
fn watch_listeners(mut diag: DiagSocket) -> mpsc::Receiver<BTreeSet<u16>> {
    let (ports_tx, ports_rx) = mpsc::channel(1);
    let spawned = std::thread::Builder::new()
        .name("mirrord-listeners".into())
        .spawn(move || {
            let mut last = None;
            loop {
                match diag.listening() {
                    Ok(listening) => {
                        let ports = local_ports(&listening);
                        if last.as_ref() != Some(&ports) {
                            last = Some(ports.clone());
                            if ports_tx.blocking_send(ports).is_err() {
                                return;
                            }
                        } else if ports_tx.is_closed() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "listing the command's listeners failed");
                        return;
                    }
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        });
    if let Err(error) = spawned {
        tracing::debug!(%error, "cannot start the listener watcher");
    }
    ports_rx
}

fn mode_verb(mode: IncomingMode) -> &'static str {
    match mode {
        IncomingMode::Mirror => "mirror",
        IncomingMode::Steal => "steal",
    }
}

/// Subscribes ports as the app starts listening and unsubscribes them as it stops.
async fn follow(
    client: Arc<AgentClient>,
    settings: IncomingSettings,
    diag: DiagSocket,
    routes: Arc<Mutex<BTreeMap<u16, u16>>>,
    failed_tx: watch::Sender<Option<String>>,
) {
    let mut ports_rx = watch_listeners(diag);
    // local port → remote port, for what is subscribed.
    let mut subscribed: BTreeMap<u16, u16> = BTreeMap::new();
    while let Some(listening) = ports_rx.recv().await {
        let gone: Vec<(u16, u16)> = subscribed
            .iter()
            .filter(|(local, _)| !listening.contains(local))
            .map(|(&local, &remote)| (local, remote))
            .collect();
        for (local, remote) in gone {
            subscribed.remove(&local);
            lock(&routes).remove(&remote);
            match client.request(Request::Unsubscribe { port: remote }).await {
                Ok(_) => tracing::debug!(local, remote, "unsubscribed"),
                Err(error) => tracing::debug!(remote, %error, "unsubscribe failed"),
            }
        }
        for &local in listening.difference(&subscribed.keys().copied().collect()) {
            let Some(subscription) = settings.subscription(local) else {
                continue;
            };
            let remote = subscription.port;
            if subscribed.values().any(|&r| r == remote) {
                tracing::debug!(
                    local,
                    remote,
                    "the remote port is taken by another local port"
                );
                continue;
            }
            let verb = mode_verb(subscription.mode);
            // Only a plain mirror, the default nobody had to ask for, may go without.
            let optional =
                subscription.mode == IncomingMode::Mirror && subscription.filter.is_none();
            // Routed before asking: the agent may hand a connection over before its answer.
            lock(&routes).insert(remote, local);
            let answer = client.request(Request::Subscribe(subscription)).await;
            if !matches!(answer, Ok(Response::Subscribed)) {
                lock(&routes).remove(&remote);
            }
            match answer {
                Ok(Response::Subscribed) => {
                    tracing::debug!(local, remote, verb, "subscribed");
                    subscribed.insert(local, remote);
                }
                Err(ClientError::Remote(error)) if optional && error.errno == libc::EOPNOTSUPP => {
                    crate::output::warn(format!(
                        "incoming traffic is off: {}; the command's ports get no traffic from the target",
                        error.message
                    ));
                    return;
                }
                Err(ClientError::Remote(error)) => {
                    failed_tx.send_replace(Some(format!(
                        "the agent refused to {verb} port {remote}: {}",
                        error.message
                    )));
                    return;
                }
                Ok(_) => {
                    failed_tx.send_replace(Some(format!(
                        "the agent answered a subscription to port {remote} with something else"
                    )));
                    return;
                }
                // The session is gone; that is reported where it is watched.
                Err(error) => return tracing::debug!(%error, "subscribe failed"),
            }
        }
    }
}

/// Delivers every connection the agent hands over, each in its own task.
async fn deliver_all(
    client: Arc<AgentClient>,
    mut streams: mpsc::UnboundedReceiver<IncomingStream>,
    routes: Arc<Mutex<BTreeMap<u16, u16>>>,
    originator: Originator,
    app: AppAddresses,
) {
    while let Some(stream) = streams.recv().await {
        let local = lock(&routes).get(&stream.connection.port).copied();
        let target = local.and_then(|port| app.for_peer(stream.connection.peer, port));
        tokio::spawn(deliver(
            client.clone(),
            stream,
            target,
            app,
            originator.clone(),
        ));
    }
}

fn remote_error(errno: i32, message: String) -> RemoteError {
    RemoteError { errno, message }
}

/// Connects one handed-over connection to the app from the client's address, then pipes it.
async fn deliver(
    client: Arc<AgentClient>,
    stream: IncomingStream,
    target: Option<SocketAddr>,
    app: AppAddresses,
    originator: Originator,
) {
    let IncomingConnection { port, peer, .. } = stream.connection;
    // A client of an IPv6 socket may appear as an IPv4-mapped address.
    let peer = app.source_for(SocketAddr::new(peer.ip().to_canonical(), peer.port()));
    let Some(target) = target else {
        let error = remote_error(
            libc::ECONNREFUSED,
            format!("nothing of this session listens for port {port}"),
        );
        return client.refuse_incoming(stream.rx, error).await;
    };
    tracing::debug!(%peer, %target, port, "incoming connection");
    let connected = tokio::time::timeout(DELIVERY_TIMEOUT, originator.connect(peer, target)).await;
    match connected {
        Ok(Ok(app)) => client.accept_incoming(stream.rx, app).await,
        Ok(Err(error)) => {
            let errno = match error.kind() {
                std::io::ErrorKind::ConnectionRefused => libc::ECONNREFUSED,
                _ => error.raw_os_error().unwrap_or(libc::EIO),
            };
            let error = remote_error(
                errno,
                format!("the local app at {target} did not take the connection: {error}"),
            );
            client.refuse_incoming(stream.rx, error).await;
        }
        Err(_) => {
            let error = remote_error(
                libc::ETIMEDOUT,
                format!("the local app at {target} did not accept within {DELIVERY_TIMEOUT:?}"),
            );
            client.refuse_incoming(stream.rx, error).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings(json: &str, flags: &IncomingFlags) -> Result<IncomingSettings, SettingsError> {
        let config = Config::parse(json).unwrap();
        IncomingSettings::new(&config.feature.network.incoming, flags)
    }

    fn ok(json: &str) -> IncomingSettings {
        settings(json, &IncomingFlags::default()).unwrap()
    }

    #[test]
    fn mirror_is_the_default_and_flags_win_over_the_file() {
        let none = ok("{}");
        assert_eq!(none.mode, Some(IncomingMode::Mirror));
        assert_eq!(
            none.subscription(8080),
            Some(Subscription {
                port: 8080,
                mode: IncomingMode::Mirror,
                filter: None,
                override_steal: false
            })
        );
        let steal = r#"{"feature": {"network": {"incoming": "steal"}}}"#;
        assert_eq!(ok(steal).mode, Some(IncomingMode::Steal));
        let off = r#"{"feature": {"network": {"incoming": "off"}}}"#;
        assert_eq!(ok(off).mode, None);
        assert_eq!(ok(off).subscription(80), None, "off never subscribes");
        let flags = IncomingFlags {
            steal: true,
            ..IncomingFlags::default()
        };
        assert_eq!(
            settings(off, &flags).unwrap().mode,
            Some(IncomingMode::Steal)
        );
        let flags = IncomingFlags {
            off: true,
            ..IncomingFlags::default()
        };
        assert_eq!(settings(steal, &flags).unwrap().subscription(80), None);
        let object = r#"{"feature": {"network": {"incoming": {"mode": "steal", "on_concurrent_steal": "override"}}}}"#;
        let object = ok(object);
        assert_eq!(object.mode, Some(IncomingMode::Steal));
        assert!(object.subscription(80).unwrap().override_steal);
        assert_eq!(
            ok(r#"{"feature": {"network": {"incoming": {}}}}"#).mode,
            Some(IncomingMode::Mirror)
        );
    }

    #[test]
    fn a_wrong_mode_is_named() {
        for json in [
            r#"{"feature": {"network": {"incoming": "stael"}}}"#,
            r#"{"feature": {"network": {"incoming": {"mode": "stael"}}}}"#,
            r#"{"feature": {"network": {"incoming": 5}}}"#,
        ] {
            let error = Config::parse(json).unwrap_err().to_string();
            assert!(error.contains("feature.network.incoming"), "{error}");
        }
    }

    #[test]
    fn filters_map_onto_the_protocol() {
        let header = ok(
            r#"{"feature": {"network": {"incoming": {"mode": "steal", "http_filter": {"header_filter": "^x-user: me$"}}}}}"#,
        );
        assert_eq!(
            header.subscription(80).unwrap().filter,
            Some(HttpFilter::Header("^x-user: me$".into()))
        );
        let composite = ok(r#"{"feature": {"network": {"incoming": {"http_filter": {
            "all_of": [{"header": "^x-user: me$"}, {"path": "^/api"}, {"method": "post"}]}}}}}"#);
        assert_eq!(
            composite.subscription(80).unwrap().filter,
            Some(HttpFilter::AllOf(vec![
                HttpFilter::Header("^x-user: me$".into()),
                HttpFilter::Path("^/api".into()),
                HttpFilter::Method("post".into()),
            ]))
        );
        let any = ok(
            r#"{"feature": {"network": {"incoming": {"http_filter": {"any_of": [{"path": "^/a"}, {"path": "^/b"}]}}}}}"#,
        );
        assert!(matches!(
            any.subscription(1).unwrap().filter,
            Some(HttpFilter::AnyOf(f)) if f.len() == 2
        ));
    }

    #[test]
    fn a_filter_limited_to_some_ports_leaves_the_others_alone() {
        let s = ok(r#"{"feature": {"network": {"incoming": {"mode": "steal",
            "http_filter": {"path_filter": "^/api", "ports": [80]}}}}}"#);
        assert!(s.subscription(80).unwrap().filter.is_some());
        assert_eq!(
            s.subscription(9000),
            None,
            "not taken whole behind the user's back"
        );
        let s = ok(
            r#"{"feature": {"network": {"incoming": {"mode": "steal", "ports": [80, 9000],
            "http_filter": {"path_filter": "^/api", "ports": [80]}}}}}"#,
        );
        assert_eq!(
            s.subscription(9000).unwrap().filter,
            None,
            "named in ports: whole"
        );
    }

    #[test]
    fn bad_filters_are_one_line_naming_the_key() {
        let error = settings(
            r#"{"feature": {"network": {"incoming": {"http_filter": {"header_filter": "^x-user: (me"}}}}}"#,
            &IncomingFlags::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            "feature.network.incoming.http_filter.header_filter is not a valid regular expression: unclosed group"
        );
        let error = settings(
            r#"{"feature": {"network": {"incoming": {"http_filter": {"any_of": [{"path": "^/a"}, {"path": "["}]}}}}}"#,
            &IncomingFlags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("feature.network.incoming.http_filter.any_of[1].path is not a valid regular expression: "),
            "{error}"
        );
        assert!(!error.contains('\n'), "{error}");
        for (json, expected) in [
            (
                r#"{"all_of": []}"#,
                "feature.network.incoming.http_filter.all_of cannot be an empty list",
            ),
            (
                r#"{"any_of": [{"path": "a", "header": "b"}]}"#,
                "feature.network.incoming.http_filter.any_of[0] takes exactly one of \"header\", \"path\" or \"method\"",
            ),
            (
                r#"{"header_filter": "a", "path_filter": "b"}"#,
                "feature.network.incoming.http_filter takes one of header_filter, path_filter, method_filter, all_of or any_of (combine them with all_of)",
            ),
        ] {
            let json = format!(
                r#"{{"feature": {{"network": {{"incoming": {{"http_filter": {json}}}}}}}}}"#
            );
            let error = settings(&json, &IncomingFlags::default()).unwrap_err();
            assert_eq!(error.to_string(), expected);
        }
        // Case-insensitive like the agent's matcher: an inline flag group is accepted.
        assert!(
            settings(
                r#"{"feature": {"network": {"incoming": {"http_filter": {"method_filter": "(?-i)GET"}}}}}"#,
                &IncomingFlags::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn ports_ignore_ports_and_mapping_choose_the_remote_port() {
        let s = ok(r#"{"feature": {"network": {"incoming": {
            "port_mapping": [[8080, 80], [9090, 443]], "ports": [80, 443, 5000], "ignore_ports": [443]}}}}"#);
        assert_eq!(s.remote_port(8080), Some(80), "mapped");
        assert_eq!(s.remote_port(9090), None, "mapped onto an ignored port");
        assert_eq!(s.remote_port(5000), Some(5000), "unmapped, listed");
        assert_eq!(s.remote_port(80), Some(80), "unmapped 80 is listed too");
        assert_eq!(s.remote_port(6000), None, "not listed");
        let s = ok(r#"{"feature": {"network": {"incoming": {"ignore_ports": [9999]}}}}"#);
        assert_eq!(s.remote_port(9999), None);
        assert_eq!(s.remote_port(1234), Some(1234));
        // -p adds to the file's mapping and wins for the same local port.
        let flags = IncomingFlags {
            port_mapping: vec![(8080, 8000), (3000, 80)],
            ..IncomingFlags::default()
        };
        let s = settings(
            r#"{"feature": {"network": {"incoming": {"port_mapping": [[8080, 80]]}}}}"#,
            &flags,
        )
        .unwrap();
        assert_eq!(s.remote_port(8080), Some(8000));
        assert_eq!(s.remote_port(3000), Some(80));
    }

    #[test]
    fn port_mapping_flags_parse() {
        assert_eq!(parse_port_mapping("8080:80"), Ok((8080, 80)));
        for bad in ["8080", "8080:", ":80", "0:80", "80:70000", "a:b", "8080-80"] {
            assert!(parse_port_mapping(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_reachable_listeners_count_once_per_port() {
        let listening: BTreeSet<SocketAddr> = [
            "0.0.0.0:8080",
            "[::]:8080",
            "127.0.0.1:5432",
            "[::1]:6379",
            "10.0.0.2:9000",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(local_ports(&listening), [8080, 9000].into());
    }

    #[test]
    fn delivered_connections_go_to_the_apps_address_of_the_peers_family() {
        let app = AppAddresses {
            v4: Ipv4Addr::new(10, 0, 0, 2),
            v6: None,
        };
        assert_eq!(
            app.for_peer("203.0.113.9:5000".parse().unwrap(), 8080),
            Some("10.0.0.2:8080".parse().unwrap())
        );
        assert_eq!(
            app.for_peer("[2001:db8::9]:5000".parse().unwrap(), 8080),
            None
        );
    }

    #[test]
    fn a_connection_from_the_targets_own_address_or_loopback_comes_from_a_stand_in() {
        let app = AppAddresses {
            v4: Ipv4Addr::new(10, 0, 0, 2),
            v6: Some("fd00::2".parse().unwrap()),
        };
        let client: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        assert_eq!(app.source_for(client), client);
        assert_eq!(
            app.source_for("10.0.0.2:5000".parse().unwrap()),
            "192.0.0.8:5000".parse().unwrap()
        );
        assert_eq!(
            app.source_for("[fd00::2]:5000".parse().unwrap()),
            "[fd6d:7264:7264::8]:5000".parse().unwrap()
        );
        assert_eq!(
            app.source_for("127.0.0.6:5000".parse().unwrap()),
            "192.0.0.8:5000".parse().unwrap()
        );
        assert_eq!(
            app.source_for("[::1]:5000".parse().unwrap()),
            "[fd6d:7264:7264::8]:5000".parse().unwrap()
        );
    }
}
