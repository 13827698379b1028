//! Decides, for each outgoing flow of the launched process, whether it leaves through the agent
//! (remote), through the host (local) or to the host's loopback; it never performs I/O, DNS
//! lookups or reads a clock — names only match addresses the caller [`Rules::learn`]s.
//!
//! Filter entries follow upstream mirrord's `feature.network.outgoing.filter` syntax,
//! `[protocol://][name|address|subnet][:port]`:
//!
//! | entry                            | matches                                          |
//! |----------------------------------|--------------------------------------------------|
//! | `:53`, `udp://:53`               | port 53 on any address (UDP only for the second) |
//! | `tcp://`                         | every TCP flow                                   |
//! | `10.0.0.1`, `10.0.0.0/8:443`     | an IPv4 address or subnet, any port or 443       |
//! | `fd00::1`, `fd00::/64`           | an IPv6 address or subnet, any port              |
//! | `[fd00::1]:80`, `[fd00::/64]:80` | IPv6 with a port: brackets are required          |
//! | `db`, `db.ns.svc.cluster.local`  | whatever the name was last learned to resolve to |
//!
//! An unbracketed target with two or more colons is always read as IPv6 without a port, so
//! `fd00::1:80` is the address `fd00::1:80`, exactly as in a URL authority.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

/// Where a flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// The agent connects from the pod's network namespace.
    Remote,
    /// The CLI connects from the host's network namespace.
    Local,
    /// The CLI connects to the same port on the host's 127.0.0.1.
    HostLoopback,
}

/// The transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// The routing inputs, already gathered from the target, the command line and the config file.
#[derive(Debug, Clone, Default)]
pub struct RulesConfig {
    /// The target's own subnets and every `--cidr`.
    pub remote_cidrs: Vec<IpNet>,
    /// Config `feature.network.outgoing.filter`.
    pub filter: Option<OutgoingFilter>,
    /// The fixed address(es) inside the namespace that reach the host's loopback.
    pub host_loopback: Vec<IpAddr>,
    /// False with `--no-udp`: all UDP stays local.
    pub udp: bool,
    /// False with `--no-outgoing`: everything stays local.
    pub outgoing: bool,
}

/// Config `feature.network.outgoing.filter`; upstream allows exactly one of its two lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutgoingFilter {
    /// Listed flows are remote; the rest follow `remote_cidrs`, else stay local.
    Remote(Vec<String>),
    /// Listed flows are local; everything else is remote.
    Local(Vec<String>),
}

/// Why a filter entry was rejected; every variant names the entry as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("empty outgoing filter entry")]
    Empty,
    #[error(
        "outgoing filter entry {entry:?}: unknown protocol {protocol:?} (expected tcp, udp or any)"
    )]
    Protocol { entry: String, protocol: String },
    #[error("outgoing filter entry {entry:?}: port {port:?} is not a number from 1 to 65535")]
    Port { entry: String, port: String },
    #[error("outgoing filter entry {entry:?}: {subnet:?} is not a valid subnet ({source})")]
    Subnet {
        entry: String,
        subnet: String,
        source: ipnet::AddrParseError,
    },
    #[error("outgoing filter entry {entry:?}: {address:?} is not a valid address: {reason}")]
    Address {
        entry: String,
        address: String,
        reason: &'static str,
    },
    #[error("outgoing filter entry {entry:?}: {name:?} is not a valid host name: {reason}")]
    Name {
        entry: String,
        name: String,
        reason: &'static str,
    },
}

/// The `protocol://` part of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FilterProtocol {
    #[default]
    Any,
    Tcp,
    Udp,
}

impl FilterProtocol {
    fn matches(self, protocol: Protocol) -> bool {
        matches!(
            (self, protocol),
            (FilterProtocol::Any, _)
                | (FilterProtocol::Tcp, Protocol::Tcp)
                | (FilterProtocol::Udp, Protocol::Udp)
        )
    }
}

/// The `name|address|subnet` part of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FilterTarget {
    /// No target written: any address.
    Any,
    Address(IpAddr),
    /// Stored with host bits cleared, so `10.1.2.3/8` and `10.0.0.0/8` are the same entry.
    Subnet(IpNet),
    /// Lower-case, without a trailing dot.
    Name(String),
}

/// One parsed filter entry; only [`FromStr`] builds one, so its name is always valid and
/// [`Display`](fmt::Display) always parses back to an equal entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FilterEntry {
    protocol: FilterProtocol,
    target: FilterTarget,
    port: Option<u16>,
}

impl FilterEntry {
    pub fn protocol(&self) -> FilterProtocol {
        self.protocol
    }

    pub fn target(&self) -> &FilterTarget {
        &self.target
    }

    /// `None` means any port.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    fn matches(
        &self,
        protocol: Protocol,
        ip: IpAddr,
        port: u16,
        learned: &HashMap<String, Vec<IpAddr>>,
    ) -> bool {
        self.protocol.matches(protocol)
            && self.port.is_none_or(|p| p == port)
            && match &self.target {
                FilterTarget::Any => true,
                FilterTarget::Address(address) => address.to_canonical() == ip,
                FilterTarget::Subnet(net) => net.contains(&ip),
                FilterTarget::Name(name) => learned.get(name).is_some_and(|a| a.contains(&ip)),
            }
    }
}

impl FromStr for FilterEntry {
    type Err = RuleError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let text = entry.trim();
        if text.is_empty() {
            return Err(RuleError::Empty);
        }
        let (protocol, rest) = match text.split_once("://") {
            Some((scheme, rest)) => (parse_protocol(entry, scheme)?, rest),
            None => (FilterProtocol::Any, text),
        };
        let (target, port) = split_target_port(entry, rest)?;
        let port = port.map(|p| parse_port(entry, p)).transpose()?;
        let target = parse_target(entry, target)?;
        Ok(FilterEntry {
            protocol,
            target,
            port,
        })
    }
}

impl fmt::Display for FilterEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            FilterProtocol::Tcp => f.write_str("tcp://")?,
            FilterProtocol::Udp => f.write_str("udp://")?,
            // An entry matching everything still needs a non-empty spelling to parse back.
            FilterProtocol::Any if self.target == FilterTarget::Any && self.port.is_none() => {
                f.write_str("any://")?
            }
            FilterProtocol::Any => {}
        }
        // IPv6 needs brackets only when a port follows, mirroring what the parser accepts.
        let bracket = self.port.is_some();
        match &self.target {
            FilterTarget::Any => {}
            FilterTarget::Address(IpAddr::V6(a)) if bracket => write!(f, "[{a}]")?,
            FilterTarget::Subnet(IpNet::V6(n)) if bracket => write!(f, "[{n}]")?,
            FilterTarget::Address(a) => write!(f, "{a}")?,
            FilterTarget::Subnet(n) => write!(f, "{n}")?,
            FilterTarget::Name(n) => f.write_str(n)?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

fn parse_protocol(entry: &str, scheme: &str) -> Result<FilterProtocol, RuleError> {
    match scheme.to_ascii_lowercase().as_str() {
        "tcp" => Ok(FilterProtocol::Tcp),
        "udp" => Ok(FilterProtocol::Udp),
        "any" => Ok(FilterProtocol::Any),
        _ => Err(RuleError::Protocol {
            entry: entry.to_owned(),
            protocol: scheme.to_owned(),
        }),
    }
}

/// Splits `target[:port]`, the target still unparsed and possibly empty.
fn split_target_port<'a>(
    entry: &str,
    rest: &'a str,
) -> Result<(&'a str, Option<&'a str>), RuleError> {
    if let Some(inner) = rest.strip_prefix('[') {
        let bad = |reason| RuleError::Address {
            entry: entry.to_owned(),
            address: rest.to_owned(),
            reason,
        };
        let (inside, after) = inner
            .split_once(']')
            .ok_or_else(|| bad("missing closing ']'"))?;
        if inside.is_empty() {
            return Err(bad("empty brackets"));
        }
        if !inside.contains(':') {
            return Err(bad("brackets are only for IPv6"));
        }
        return match after {
            "" => Ok((inside, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((inside, Some(port))),
                None => Err(bad("only ':port' may follow ']'")),
            },
        };
    }
    match rest.split_once(':') {
        Some((target, port)) if !port.contains(':') => Ok((target, Some(port))),
        _ => Ok((rest, None)),
    }
}

fn parse_port(entry: &str, port: &str) -> Result<u16, RuleError> {
    // `u16::from_str` would also take a leading '+'; only plain digits are a port.
    let valid = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u16>() {
        Ok(p) if valid && p != 0 => Ok(p),
        _ => Err(RuleError::Port {
            entry: entry.to_owned(),
            port: port.to_owned(),
        }),
    }
}

fn parse_target(entry: &str, target: &str) -> Result<FilterTarget, RuleError> {
    if target.is_empty() {
        return Ok(FilterTarget::Any);
    }
    if target.contains('/') {
        return target
            .parse::<IpNet>()
            .map(|net| FilterTarget::Subnet(net.trunc()))
            .map_err(|source| RuleError::Subnet {
                entry: entry.to_owned(),
                subnet: target.to_owned(),
                source,
            });
    }
    if let Ok(address) = target.parse::<IpAddr>() {
        return Ok(FilterTarget::Address(address));
    }
    let bad_address = |reason| RuleError::Address {
        entry: entry.to_owned(),
        address: target.to_owned(),
        reason,
    };
    if target.contains(':') {
        return Err(bad_address("not an IPv6 address"));
    }
    // A name's last label is never all digits (RFC 1123 §2.1), so this was meant as IPv4.
    let last_label = target
        .strip_suffix('.')
        .unwrap_or(target)
        .rsplit('.')
        .next();
    if last_label.is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad_address("not an IPv4 address"));
    }
    parse_name(target)
        .map(FilterTarget::Name)
        .map_err(|reason| RuleError::Name {
            entry: entry.to_owned(),
            name: target.to_owned(),
            reason,
        })
}

/// Lower-cases and drops one trailing dot; the reason is for the user when it is not a name.
fn parse_name(name: &str) -> Result<String, &'static str> {
    let name = normalize_name(name);
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        // '_' appears in service names (`_http._tcp.svc`), so it is allowed.
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-', '_' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
    }
    Ok(name)
}

fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Which list of `feature.network.outgoing.filter` the entries came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterKind {
    Remote,
    Local,
}

/// The rule engine: built once from [`RulesConfig`], asked once per new flow.
#[derive(Debug, Clone)]
pub struct Rules {
    remote_cidrs: Vec<IpNet>,
    filter: Option<(FilterKind, Vec<FilterEntry>)>,
    host_loopback: Vec<IpAddr>,
    udp: bool,
    outgoing: bool,
    /// Only names that appear in the filter, so a chatty resolver cannot grow this map.
    learned: HashMap<String, Vec<IpAddr>>,
}

impl Rules {
    /// Parses every filter entry; the first bad one is the error.
    pub fn new(config: RulesConfig) -> Result<Rules, RuleError> {
        let filter = match config.filter {
            None => None,
            Some(OutgoingFilter::Remote(entries)) => {
                Some((FilterKind::Remote, parse_all(&entries)?))
            }
            Some(OutgoingFilter::Local(entries)) => Some((FilterKind::Local, parse_all(&entries)?)),
        };
        Ok(Rules {
            remote_cidrs: config.remote_cidrs,
            filter,
            host_loopback: config.host_loopback,
            udp: config.udp,
            outgoing: config.outgoing,
            learned: HashMap::new(),
        })
    }

    /// The route of a new flow to `dst`.
    pub fn route(&self, protocol: Protocol, dst: SocketAddr) -> Route {
        // A v4-mapped IPv6 destination is an IPv4 flow; match it against IPv4 rules.
        let ip = dst.ip().to_canonical();
        if self.host_loopback.iter().any(|h| h.to_canonical() == ip) {
            return Route::HostLoopback;
        }
        if !self.outgoing || (protocol == Protocol::Udp && !self.udp) || never_remote(ip) {
            return Route::Local;
        }
        let matching = |entries: &[FilterEntry]| {
            entries
                .iter()
                .any(|e| e.matches(protocol, ip, dst.port(), &self.learned))
        };
        match &self.filter {
            Some((FilterKind::Local, entries)) if matching(entries) => return Route::Local,
            Some((FilterKind::Remote, entries)) if matching(entries) => return Route::Remote,
            _ => {}
        }
        if self.remote_cidrs.iter().any(|net| net.contains(&ip)) {
            return Route::Remote;
        }
        match self.filter {
            // Upstream: with a local list, everything not listed is remote.
            Some((FilterKind::Local, _)) => Route::Remote,
            _ => Route::Local,
        }
    }

    /// Host names used in the filter, each once, in the order written, for the DNS stub to
    /// resolve and [`learn`](Rules::learn).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        let entries = self.filter.iter().flat_map(|(_, entries)| entries);
        for entry in entries {
            if let FilterTarget::Name(name) = &entry.target
                && !names.contains(name)
            {
                names.push(name.clone());
            }
        }
        names
    }

    /// Records that `name` now resolves to `addrs`, replacing what it resolved to before (an
    /// empty `addrs` forgets it); expiring the answer is the caller's job. Names the filter
    /// does not use are ignored.
    pub fn learn(&mut self, name: &str, addrs: &[IpAddr]) {
        let name = normalize_name(name);
        let used = self
            .filter
            .iter()
            .flat_map(|(_, e)| e)
            .any(|e| match &e.target {
                FilterTarget::Name(n) => *n == name,
                _ => false,
            });
        if !used {
            return;
        }
        if addrs.is_empty() {
            self.learned.remove(&name);
        } else {
            let addrs = addrs.iter().map(|a| a.to_canonical()).collect();
            self.learned.insert(name, addrs);
        }
    }
}

fn parse_all(entries: &[String]) -> Result<Vec<FilterEntry>, RuleError> {
    entries.iter().map(|e| e.parse()).collect()
}

/// Destinations the agent could never serve: they mean this machine or a local segment.
fn never_remote(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip == Ipv4Addr::BROADCAST
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn entry(s: &str) -> FilterEntry {
        match s.parse() {
            Ok(e) => e,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn err(s: &str) -> RuleError {
        match s.parse::<FilterEntry>() {
            Ok(e) => panic!("{s:?} should be rejected, parsed as {e:?}"),
            Err(e) => e,
        }
    }

    fn ip(s: &str) -> IpAddr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    fn net(s: &str) -> IpNet {
        match s.parse() {
            Ok(n) => n,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    fn name(s: &str) -> FilterTarget {
        FilterTarget::Name(s.to_owned())
    }

    fn check(s: &str, protocol: FilterProtocol, target: FilterTarget, port: Option<u16>) {
        let e = entry(s);
        assert_eq!(
            (e.protocol(), e.target(), e.port()),
            (protocol, &target, port),
            "{s:?}"
        );
    }

    // ---- parsing -------------------------------------------------------------------------

    #[test]
    fn parses_port_only_forms() {
        use FilterProtocol::*;
        check(":53", Any, FilterTarget::Any, Some(53));
        check("udp://:53", Udp, FilterTarget::Any, Some(53));
        check("tcp://:5432", Tcp, FilterTarget::Any, Some(5432));
        check("any://:1", Any, FilterTarget::Any, Some(1));
        check(":65535", Any, FilterTarget::Any, Some(65535));
    }

    #[test]
    fn parses_protocol_only_forms() {
        use FilterProtocol::*;
        check("tcp://", Tcp, FilterTarget::Any, None);
        check("udp://", Udp, FilterTarget::Any, None);
        check("any://", Any, FilterTarget::Any, None);
        check("TCP://", Tcp, FilterTarget::Any, None);
        check("Udp://:53", Udp, FilterTarget::Any, Some(53));
    }

    #[test]
    fn parses_ipv4_addresses_and_subnets() {
        use FilterProtocol::*;
        check("10.0.0.1", Any, FilterTarget::Address(ip("10.0.0.1")), None);
        check(
            "10.0.0.1:80",
            Any,
            FilterTarget::Address(ip("10.0.0.1")),
            Some(80),
        );
        check(
            "tcp://10.0.0.1:80",
            Tcp,
            FilterTarget::Address(ip("10.0.0.1")),
            Some(80),
        );
        check(
            "10.0.0.0/8",
            Any,
            FilterTarget::Subnet(net("10.0.0.0/8")),
            None,
        );
        check(
            "udp://10.0.0.0/8:53",
            Udp,
            FilterTarget::Subnet(net("10.0.0.0/8")),
            Some(53),
        );
        check(
            "0.0.0.0/0",
            Any,
            FilterTarget::Subnet(net("0.0.0.0/0")),
            None,
        );
        check(
            "10.0.0.1/32",
            Any,
            FilterTarget::Subnet(net("10.0.0.1/32")),
            None,
        );
    }

    #[test]
    fn subnet_host_bits_are_cleared() {
        assert_eq!(entry("10.1.2.3/8"), entry("10.0.0.0/8"));
        assert_eq!(entry("fd00::1/64"), entry("fd00::/64"));
        assert_eq!(entry("10.1.2.3/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn parses_ipv6_forms() {
        use FilterProtocol::*;
        let a = || FilterTarget::Address(ip("fd00::1"));
        check("fd00::1", Any, a(), None);
        check("[fd00::1]", Any, a(), None);
        check("[fd00::1]:80", Any, a(), Some(80));
        check("tcp://[fd00::1]:80", Tcp, a(), Some(80));
        check("udp://fd00::1", Udp, a(), None);
        check("::1", Any, FilterTarget::Address(ip("::1")), None);
        check("::", Any, FilterTarget::Address(ip("::")), None);
        check(
            "[::]:8080",
            Any,
            FilterTarget::Address(ip("::")),
            Some(8080),
        );
        check(
            "fd00::/64",
            Any,
            FilterTarget::Subnet(net("fd00::/64")),
            None,
        );
        check(
            "[fd00::/64]:80",
            Any,
            FilterTarget::Subnet(net("fd00::/64")),
            Some(80),
        );
        check("::/0", Any, FilterTarget::Subnet(net("::/0")), None);
        check(
            "FD00::ABCD",
            Any,
            FilterTarget::Address(ip("fd00::abcd")),
            None,
        );
        check(
            "::ffff:10.0.0.1",
            Any,
            FilterTarget::Address(ip("::ffff:10.0.0.1")),
            None,
        );
    }

    #[test]
    fn unbracketed_ipv6_never_has_a_port() {
        // As in URLs: the last group is part of the address, not a port.
        check(
            "fd00::1:80",
            FilterProtocol::Any,
            FilterTarget::Address(ip("fd00::1:80")),
            None,
        );
    }

    #[test]
    fn parses_names() {
        use FilterProtocol::*;
        check("db", Any, name("db"), None);
        check("db:5432", Any, name("db"), Some(5432));
        check("tcp://db:5432", Tcp, name("db"), Some(5432));
        check(
            "db.default.svc.cluster.local",
            Any,
            name("db.default.svc.cluster.local"),
            None,
        );
        check(
            "DB.Default.SVC.cluster.local.",
            Any,
            name("db.default.svc.cluster.local"),
            None,
        );
        check("db.:5432", Any, name("db"), Some(5432));
        check("localhost", Any, name("localhost"), None);
        check("my-db-0.my_svc", Any, name("my-db-0.my_svc"), None);
        check("_http._tcp.web", Any, name("_http._tcp.web"), None);
        check("1password.com", Any, name("1password.com"), None);
        check("10.0.0.x", Any, name("10.0.0.x"), None);
        let label63 = "a".repeat(63);
        check(&label63, Any, name(&label63), None);
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        assert_eq!(entry("  tcp://db:80 \n"), entry("tcp://db:80"));
    }

    #[test]
    fn rejects_empty_entries() {
        assert_eq!(err(""), RuleError::Empty);
        assert_eq!(err("   "), RuleError::Empty);
    }

    #[test]
    fn rejects_bad_protocols() {
        for s in ["http://db", "tcp6://db", "://db", "icmp://:1", "tcp ://db"] {
            assert!(matches!(err(s), RuleError::Protocol { .. }), "{s:?}");
        }
        assert_eq!(
            err("sctp://db:1"),
            RuleError::Protocol {
                entry: "sctp://db:1".into(),
                protocol: "sctp".into()
            }
        );
    }

    #[test]
    fn rejects_bad_ports() {
        for s in [
            ":0",
            "db:0",
            ":65536",
            ":99999999999999999999",
            "db:",
            ":",
            "tcp://:",
            "db:http",
            ":+80",
            ":-1",
            ": 80",
            "[fd00::1]:",
            "[fd00::1]:0",
            "10.0.0.1:70000",
        ] {
            assert!(
                matches!(err(s), RuleError::Port { .. }),
                "{s:?}: {:?}",
                err(s)
            );
        }
        assert_eq!(
            err("db:0"),
            RuleError::Port {
                entry: "db:0".into(),
                port: "0".into()
            }
        );
    }

    #[test]
    fn rejects_bad_subnets() {
        for s in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "/8",
            "10.0.0/8",
            "fd00::/129",
            "db/8",
            "10.0.0.0/8/8",
            "[fd00::/200]:80",
        ] {
            assert!(
                matches!(err(s), RuleError::Subnet { .. }),
                "{s:?}: {:?}",
                err(s)
            );
        }
    }

    #[test]
    fn rejects_bad_addresses() {
        for s in [
            "10.0.0.256",
            "10.0.0",
            "10.0.0.01",
            "1.2.3.4.5",
            "300.1.1.1:80",
            "fd00:::1",
            "fe80::1%eth0",
            "db:80:90",
            "[fd00::1",
            "[fd00::1]80",
            "[]:80",
            "[10.0.0.1]:80",
            "[db]:80",
            "gggg::1",
            "123",
        ] {
            assert!(
                matches!(err(s), RuleError::Address { .. }),
                "{s:?}: {:?}",
                err(s)
            );
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long_label = "a".repeat(64);
        let long_name = [
            "a".repeat(60),
            "b".repeat(60),
            "c".repeat(60),
            "d".repeat(60),
            "e".repeat(10),
        ]
        .join(".");
        for s in [
            "db$",
            "*.example.com",
            "d b",
            "db..svc",
            ".db",
            ".",
            "-db",
            "db-.svc",
            "exämple.com",
            "db/",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            let e = err(s);
            // `db/` is a subnet attempt; everything else must be blamed on the name.
            assert!(
                matches!(e, RuleError::Name { .. } | RuleError::Subnet { .. }),
                "{s:?}: {e:?}"
            );
        }
        assert!(matches!(err("db$:80"), RuleError::Name { ref name, .. } if name == "db$"));
    }

    #[test]
    fn errors_name_the_entry_and_the_reason() {
        let msg = err("tcp://db$:80").to_string();
        assert!(
            msg.contains("\"tcp://db$:80\"") && msg.contains("letters"),
            "{msg}"
        );
        let msg = err(":0").to_string();
        assert!(
            msg.contains("\":0\"") && msg.contains("1 to 65535"),
            "{msg}"
        );
        let msg = err("10.0.0.0/33").to_string();
        assert!(
            msg.contains("\"10.0.0.0/33\"") && msg.contains("subnet"),
            "{msg}"
        );
        let msg = err("http://db").to_string();
        assert!(msg.contains("\"http\""), "{msg}");
        let msg = err("[fd00::1").to_string();
        assert!(msg.contains("']'"), "{msg}");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            ":53",
            "udp://:53",
            "tcp://:5432",
            "tcp://",
            "udp://",
            "any://",
            "10.0.0.1",
            "10.0.0.1:80",
            "tcp://10.0.0.0/8:443",
            "fd00::1",
            "[fd00::1]:80",
            "fd00::/64",
            "udp://[fd00::/64]:53",
            "::ffff:10.0.0.1",
            "db",
            "db:5432",
            "tcp://db.default.svc.cluster.local:5432",
        ] {
            let e = entry(s);
            assert_eq!(e.to_string(), s, "canonical spelling");
            assert_eq!(entry(&e.to_string()), e, "{s:?}");
        }
    }

    #[test]
    fn display_canonicalizes_other_spellings() {
        for (s, canonical) in [
            ("any://:53", ":53"),
            ("TCP://DB.:80", "tcp://db:80"),
            ("[fd00::1]", "fd00::1"),
            ("[fd00::/64]", "fd00::/64"),
            ("FD00::1", "fd00::1"),
            ("any://db", "db"),
        ] {
            let e = entry(s);
            assert_eq!(e.to_string(), canonical, "{s:?}");
            assert_eq!(entry(canonical), e, "{s:?}");
        }
    }

    // ---- routing -------------------------------------------------------------------------

    fn config() -> RulesConfig {
        RulesConfig {
            remote_cidrs: vec![
                net("10.96.0.0/12"),
                net("10.244.0.0/16"),
                net("fd00:10::/64"),
            ],
            filter: None,
            host_loopback: vec![ip("169.254.77.1"), ip("fd77::1")],
            udp: true,
            outgoing: true,
        }
    }

    fn rules(config: RulesConfig) -> Rules {
        match Rules::new(config) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn with_remote(entries: &[&str]) -> Rules {
        let filter = OutgoingFilter::Remote(entries.iter().map(|s| s.to_string()).collect());
        rules(RulesConfig {
            filter: Some(filter),
            ..config()
        })
    }

    fn with_local(entries: &[&str]) -> Rules {
        let filter = OutgoingFilter::Local(entries.iter().map(|s| s.to_string()).collect());
        rules(RulesConfig {
            filter: Some(filter),
            ..config()
        })
    }

    use Protocol::{Tcp, Udp};
    use Route::{HostLoopback, Local, Remote};

    #[test]
    fn remote_cidrs_are_remote_and_the_rest_local() {
        let r = rules(config());
        assert_eq!(r.route(Tcp, sa("10.96.0.10:53")), Remote);
        assert_eq!(r.route(Udp, sa("10.96.0.10:53")), Remote);
        assert_eq!(r.route(Tcp, sa("10.244.3.7:8080")), Remote);
        assert_eq!(r.route(Tcp, sa("[fd00:10::5]:80")), Remote);
        assert_eq!(r.route(Tcp, sa("93.184.216.34:443")), Local);
        assert_eq!(r.route(Tcp, sa("10.95.255.255:80")), Local);
        assert_eq!(r.route(Tcp, sa("[2606:4700::1111]:443")), Local);
    }

    #[test]
    fn host_loopback_wins_over_everything() {
        let r = rules(RulesConfig {
            remote_cidrs: vec![net("0.0.0.0/0"), net("::/0")],
            udp: false,
            outgoing: false,
            ..config()
        });
        assert_eq!(r.route(Tcp, sa("169.254.77.1:5432")), HostLoopback);
        assert_eq!(r.route(Udp, sa("169.254.77.1:53")), HostLoopback);
        assert_eq!(r.route(Tcp, sa("[fd77::1]:5432")), HostLoopback);
        assert_eq!(r.route(Tcp, sa("169.254.77.2:5432")), Local);
        let r = with_remote(&["169.254.77.1"]);
        assert_eq!(r.route(Tcp, sa("169.254.77.1:80")), HostLoopback);
    }

    #[test]
    fn host_loopback_matches_v4_mapped_destinations() {
        let r = rules(config());
        assert_eq!(r.route(Tcp, sa("[::ffff:169.254.77.1]:80")), HostLoopback);
    }

    #[test]
    fn no_outgoing_keeps_everything_local() {
        let r = rules(RulesConfig {
            outgoing: false,
            filter: Some(OutgoingFilter::Remote(vec!["tcp://".into()])),
            ..config()
        });
        assert_eq!(r.route(Tcp, sa("10.96.0.10:80")), Local);
        assert_eq!(r.route(Udp, sa("10.96.0.10:53")), Local);
        assert_eq!(r.route(Tcp, sa("[fd00:10::5]:80")), Local);
    }

    #[test]
    fn no_udp_keeps_udp_local_but_not_tcp() {
        let r = rules(RulesConfig {
            udp: false,
            filter: Some(OutgoingFilter::Remote(vec!["udp://:53".into()])),
            ..config()
        });
        assert_eq!(r.route(Udp, sa("10.96.0.10:53")), Local);
        assert_eq!(r.route(Udp, sa("8.8.8.8:53")), Local);
        assert_eq!(r.route(Udp, sa("[fd00:10::5]:53")), Local);
        assert_eq!(r.route(Tcp, sa("10.96.0.10:53")), Remote);
    }

    #[test]
    fn loopback_unspecified_multicast_and_broadcast_stay_local() {
        let r = rules(RulesConfig {
            remote_cidrs: vec![net("0.0.0.0/0"), net("::/0")],
            ..config()
        });
        for dst in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "0.0.0.0:80",
            "224.0.0.251:5353",
            "239.255.255.250:1900",
            "255.255.255.255:67",
            "[::1]:80",
            "[::]:80",
            "[ff02::fb]:5353",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert_eq!(r.route(Udp, sa(dst)), Local, "{dst}");
            assert_eq!(r.route(Tcp, sa(dst)), Local, "{dst}");
        }
        let r = with_remote(&["::ffff:1.2.3.4"]);
        assert_eq!(
            r.route(Tcp, sa("1.2.3.4:80")),
            Remote,
            "a v4-mapped entry is IPv4"
        );
        let r = with_remote(&["127.0.0.1", "any://"]);
        assert_eq!(r.route(Tcp, sa("127.0.0.1:80")), Local);
        assert_eq!(r.route(Tcp, sa("1.1.1.1:80")), Remote);
    }

    #[test]
    fn remote_filter_sends_listed_flows_remote() {
        let r = with_remote(&[
            "udp://:53",
            "tcp://1.2.3.0/24:443",
            "[2001:db8::1]:80",
            "5.6.7.8",
        ]);
        assert_eq!(r.route(Udp, sa("8.8.8.8:53")), Remote);
        assert_eq!(r.route(Tcp, sa("8.8.8.8:53")), Local);
        assert_eq!(r.route(Tcp, sa("1.2.3.99:443")), Remote);
        assert_eq!(r.route(Udp, sa("1.2.3.99:443")), Local);
        assert_eq!(r.route(Tcp, sa("1.2.3.99:80")), Local);
        assert_eq!(r.route(Tcp, sa("1.2.4.1:443")), Local);
        assert_eq!(r.route(Tcp, sa("[2001:db8::1]:80")), Remote);
        assert_eq!(r.route(Tcp, sa("[2001:db8::1]:81")), Local);
        assert_eq!(r.route(Udp, sa("5.6.7.8:9")), Remote);
        assert_eq!(r.route(Tcp, sa("5.6.7.9:9")), Local);
    }

    #[test]
    fn remote_filter_keeps_remote_cidrs_remote() {
        let r = with_remote(&["tcp://1.2.3.4"]);
        assert_eq!(r.route(Tcp, sa("10.96.0.10:80")), Remote);
        assert_eq!(r.route(Tcp, sa("[fd00:10::5]:80")), Remote);
        assert_eq!(r.route(Tcp, sa("4.3.2.1:80")), Local);
    }

    #[test]
    fn local_filter_keeps_listed_flows_local_and_the_rest_remote() {
        let r = with_local(&["tcp://:443", "192.168.0.0/16", "udp://[2001:db8::/32]:53"]);
        assert_eq!(r.route(Tcp, sa("1.1.1.1:443")), Local);
        assert_eq!(
            r.route(Tcp, sa("10.96.0.10:443")),
            Local,
            "the list beats remote_cidrs"
        );
        assert_eq!(r.route(Udp, sa("1.1.1.1:443")), Remote);
        assert_eq!(r.route(Tcp, sa("192.168.1.1:80")), Local);
        assert_eq!(r.route(Udp, sa("[2001:db8::53]:53")), Local);
        assert_eq!(r.route(Tcp, sa("[2001:db8::53]:53")), Remote);
        assert_eq!(r.route(Tcp, sa("1.1.1.1:80")), Remote, "not listed: remote");
        assert_eq!(r.route(Tcp, sa("[2606:4700::1111]:80")), Remote);
        assert_eq!(r.route(Tcp, sa("10.96.0.10:80")), Remote);
    }

    #[test]
    fn local_filter_does_not_override_earlier_rules() {
        let r = rules(RulesConfig {
            udp: false,
            filter: Some(OutgoingFilter::Local(vec!["1.1.1.1".into()])),
            ..config()
        });
        assert_eq!(r.route(Udp, sa("9.9.9.9:53")), Local);
        assert_eq!(r.route(Tcp, sa("127.0.0.1:80")), Local);
        assert_eq!(r.route(Tcp, sa("169.254.77.1:80")), HostLoopback);
    }

    #[test]
    fn empty_filters_behave_like_the_list_kind() {
        let r = with_remote(&[]);
        assert_eq!(r.route(Tcp, sa("1.1.1.1:80")), Local);
        assert_eq!(r.route(Tcp, sa("10.96.0.1:80")), Remote);
        let r = with_local(&[]);
        assert_eq!(r.route(Tcp, sa("1.1.1.1:80")), Remote);
    }

    #[test]
    fn names_match_only_after_learn() {
        let mut r = with_remote(&["tcp://db.default.svc.cluster.local:5432", "api"]);
        assert_eq!(r.route(Tcp, sa("1.2.3.4:5432")), Local);
        r.learn(
            "db.default.svc.cluster.local",
            &[ip("1.2.3.4"), ip("2001:db8::4")],
        );
        assert_eq!(r.route(Tcp, sa("1.2.3.4:5432")), Remote);
        assert_eq!(r.route(Tcp, sa("[2001:db8::4]:5432")), Remote);
        assert_eq!(
            r.route(Tcp, sa("1.2.3.4:5433")),
            Local,
            "port still applies"
        );
        assert_eq!(
            r.route(Udp, sa("1.2.3.4:5432")),
            Local,
            "protocol still applies"
        );
        assert_eq!(r.route(Tcp, sa("1.2.3.5:5432")), Local);
        assert_eq!(r.route(Tcp, sa("5.5.5.5:80")), Local, "api not learned yet");
        r.learn("API.", &[ip("5.5.5.5")]);
        assert_eq!(r.route(Tcp, sa("5.5.5.5:80")), Remote);
    }

    #[test]
    fn learn_replaces_and_forgets() {
        let mut r = with_local(&["db"]);
        r.learn("db", &[ip("1.2.3.4")]);
        assert_eq!(r.route(Tcp, sa("1.2.3.4:1")), Local);
        r.learn("db", &[ip("1.2.3.5")]);
        assert_eq!(r.route(Tcp, sa("1.2.3.4:1")), Remote, "old answer replaced");
        assert_eq!(r.route(Tcp, sa("1.2.3.5:1")), Local);
        r.learn("db", &[]);
        assert_eq!(r.route(Tcp, sa("1.2.3.5:1")), Remote, "forgotten");
    }

    #[test]
    fn learn_ignores_names_not_in_the_filter() {
        let mut r = with_remote(&["db"]);
        r.learn("other", &[ip("1.2.3.4")]);
        assert_eq!(r.route(Tcp, sa("1.2.3.4:1")), Local);
        assert!(r.learned.is_empty());
    }

    #[test]
    fn learned_v4_mapped_addresses_match_ipv4_flows() {
        let mut r = with_remote(&["db"]);
        r.learn(
            "db",
            &[IpAddr::V6(Ipv4Addr::new(1, 2, 3, 4).to_ipv6_mapped())],
        );
        assert_eq!(r.route(Tcp, sa("1.2.3.4:1")), Remote);
    }

    #[test]
    fn names_lists_each_filter_name_once() {
        let r = with_remote(&[
            "db:5432",
            "tcp://db",
            "10.0.0.1",
            "API.Example.com.",
            ":53",
            "cache",
        ]);
        assert_eq!(r.names(), ["db", "api.example.com", "cache"]);
        assert!(rules(config()).names().is_empty());
        assert!(with_local(&["1.1.1.1"]).names().is_empty());
    }

    #[test]
    fn new_rejects_the_first_bad_entry() {
        let e = Rules::new(RulesConfig {
            filter: Some(OutgoingFilter::Local(vec![
                "db".into(),
                "tcp://:0".into(),
                "x$".into(),
            ])),
            ..config()
        });
        assert!(matches!(e, Err(RuleError::Port { ref entry, .. }) if entry == "tcp://:0"));
        let e = Rules::new(RulesConfig {
            filter: Some(OutgoingFilter::Remote(vec!["".into()])),
            ..config()
        });
        assert!(matches!(e, Err(RuleError::Empty)));
    }

    #[test]
    fn upstream_examples() {
        // From upstream mirrord's docs: DNS and a cluster database go remote, the rest local.
        let mut r = with_remote(&["udp://:53", "tcp://db.default.svc.cluster.local:5432"]);
        r.learn("db.default.svc.cluster.local", &[ip("34.1.2.3")]);
        assert_eq!(r.route(Udp, sa("192.168.1.1:53")), Remote);
        assert_eq!(r.route(Tcp, sa("34.1.2.3:5432")), Remote);
        assert_eq!(r.route(Tcp, sa("140.82.112.3:443")), Local);
        // Upstream: "everything not listed is remote" — keep one SaaS and a subnet local.
        let mut r = with_local(&["tcp://api.stripe.com:443", "172.16.0.0/12"]);
        r.learn("api.stripe.com", &[ip("54.187.174.169")]);
        assert_eq!(r.route(Tcp, sa("54.187.174.169:443")), Local);
        assert_eq!(r.route(Tcp, sa("172.20.0.5:6379")), Local);
        assert_eq!(r.route(Tcp, sa("140.82.112.3:443")), Remote);
        assert_eq!(r.route(Udp, sa("54.187.174.169:443")), Remote);
    }

    #[test]
    fn ipv6_subnet_entries_match_ipv6_only() {
        let r = with_remote(&["::/0"]);
        assert_eq!(r.route(Tcp, sa("[2606:4700::1]:80")), Remote);
        assert_eq!(r.route(Tcp, sa("1.1.1.1:80")), Local);
        let r = with_remote(&["0.0.0.0/0"]);
        assert_eq!(r.route(Tcp, sa("1.1.1.1:80")), Remote);
        assert_eq!(
            r.route(Tcp, SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 80)),
            Local
        );
        assert_eq!(r.route(Tcp, sa("[2606:4700::1]:80")), Local);
    }
}
