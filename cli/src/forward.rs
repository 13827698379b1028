//! `mirrord port-forward`: local TCP ports whose connections are opened from the target's
//! network, to a host named as the target names it (its resolv.conf search domains, through the
//! agent). It listens on this machine's loopback only and never launches a process.
//!
//! [`parse_forward`] and [`candidates`] are pure (the `-L` syntax, resolv.conf's search rule);
//! [`serve`] is the I/O: listeners, lookups through the agent, byte pipes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mirrord_protocol::{Request, Response};
use tokio::net::{TcpListener, TcpStream};

use crate::client::AgentClient;
use crate::dns::TargetResolvConf;
use crate::output;

/// One `-L [LOCAL_PORT:]HOST:PORT`: `local` 0 picks a free port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub local: u16,
    pub host: String,
    pub port: u16,
}

/// `[LOCAL_PORT:]HOST:PORT`, HOST a name, an IPv4 address or an IPv6 address in brackets;
/// without LOCAL_PORT the local port is PORT, as with `ssh -L` and `kubectl port-forward`.
pub fn parse_forward(text: &str) -> Result<Forward, String> {
    let wrong = || format!("expected [LOCAL_PORT:]HOST:PORT (e.g. 5432:db:5432), got `{text}`");
    let port_of = |digits: &str| digits.parse::<u16>().ok().filter(|port| *port != 0);
    let (rest, port) = text.rsplit_once(':').ok_or_else(wrong)?;
    let port = port_of(port).ok_or_else(wrong)?;
    let (local, host) = if let Some(bracketed) = rest.strip_suffix(']') {
        let (before, host) = bracketed.rsplit_once('[').ok_or_else(wrong)?;
        let local = match before {
            "" => None,
            before => Some(before.strip_suffix(':').ok_or_else(wrong)?),
        };
        host.parse::<std::net::Ipv6Addr>().map_err(|_| wrong())?;
        (local, host)
    } else {
        match rest.rsplit_once(':') {
            Some((local, host)) => (Some(local), host),
            None => (None, rest),
        }
    };
    let local = match local {
        // `0:` asks for any free port.
        Some("0") => 0,
        Some(local) => port_of(local).ok_or_else(wrong)?,
        None => port,
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(wrong());
    }
    Ok(Forward {
        local,
        host: host.to_owned(),
        port,
    })
}

/// The names to look up for `host`, in resolv.conf(5)'s order: an absolute name (trailing dot)
/// alone; a name with at least `ndots` dots first as written, then with each search domain; a
/// shorter one with the search domains first.
pub fn candidates(host: &str, conf: &TargetResolvConf) -> Vec<String> {
    if let Some(absolute) = host.strip_suffix('.') {
        return vec![absolute.to_owned()];
    }
    let ndots = conf
        .options
        .iter()
        .flat_map(|line| line.split_whitespace())
        .filter_map(|option| option.strip_prefix("ndots:")?.parse::<usize>().ok())
        .next_back()
        .unwrap_or(1);
    let searched = conf
        .search
        .iter()
        .map(|domain| format!("{host}.{}", domain.trim_end_matches('.')));
    if host.matches('.').count() >= ndots {
        std::iter::once(host.to_owned()).chain(searched).collect()
    } else {
        searched.chain(std::iter::once(host.to_owned())).collect()
    }
}

/// Looks `host` up through the agent as the target would: its first IPv4 address, else its
/// first IPv6 one.
async fn resolve(client: &AgentClient, conf: &TargetResolvConf, host: &str) -> Option<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    for name in candidates(host, conf) {
        for record_type in [RecordType::A, RecordType::AAAA] {
            if let Some(ip) = lookup(client, &name, record_type).await {
                return Some(ip);
            }
        }
    }
    None
}

async fn lookup(client: &AgentClient, name: &str, record_type: RecordType) -> Option<IpAddr> {
    let name = Name::from_str(&format!("{name}.")).ok()?;
    let mut query = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name, record_type));
    let bytes = query.to_vec().ok()?;
    let Ok(Response::Dns(answer)) = client.request(Request::Dns(bytes)).await else {
        return None;
    };
    let answer = Message::from_vec(&answer).ok()?;
    answer.answers.iter().find_map(|record| match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    })
}

fn rand_id() -> u16 {
    let mut bytes = [0u8; 2];
    // A fixed id is as good when the random source fails: one query is in flight per lookup.
    let _ = getrandom::fill(&mut bytes);
    u16::from_ne_bytes(bytes)
}

/// Listens on every forward's local port, then pipes each connection to its host until the
/// session ends (Ctrl-C, SIGTERM: `Ok`; the agent lost: an error).
pub async fn serve(
    client: Arc<AgentClient>,
    forwards: &[Forward],
    label: &str,
) -> anyhow::Result<()> {
    let conf = Arc::new(crate::dns::target_resolv_conf(&client).await);
    let mut listeners = Vec::new();
    for forward in forwards {
        let Some(ip) = resolve(&client, &conf, &forward.host).await else {
            bail!(
                "cannot resolve {} in {label}; check the name (mirrord exec -t {label} -- getent hosts {})",
                forward.host,
                forward.host
            );
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, forward.local))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on 127.0.0.1:{}; choose another local port (-L OTHER:{}:{})",
                    forward.local, forward.host, forward.port
                )
            })?;
        let local = listener.local_addr()?;
        output::note(format!(
            "forwarding {local} to {}:{} ({ip}) in {label}",
            forward.host, forward.port
        ));
        listeners.push((listener, forward.clone()));
    }
    output::note("press Ctrl-C to stop");
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, forward) in listeners {
        let client = client.clone();
        let conf = conf.clone();
        tasks.spawn(async move { accept_loop(listener, forward, client, conf).await });
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
        reason = client.lost() => Err(anyhow!("lost the agent ({reason}); start mirrord port-forward again")),
        Some(Ok(Err(error))) = tasks.join_next() => Err(error),
    }
}

async fn accept_loop(
    listener: TcpListener,
    forward: Forward,
    client: Arc<AgentClient>,
    conf: Arc<TargetResolvConf>,
) -> anyhow::Result<()> {
    let forward = Arc::new(forward);
    loop {
        let (socket, _) = listener
            .accept()
            .await
            .with_context(|| format!("cannot accept on port {}", forward.local))?;
        let client = client.clone();
        let conf = conf.clone();
        let forward = forward.clone();
        tokio::spawn(async move { connection(socket, &forward, &client, &conf).await });
    }
}

/// One local connection: the host is looked up again (its address may have moved), connected
/// from the target, and piped; a failure is one line and the local connection is closed.
async fn connection(
    socket: TcpStream,
    forward: &Forward,
    client: &AgentClient,
    conf: &TargetResolvConf,
) {
    let _ = socket.set_nodelay(true);
    let Some(ip) = resolve(client, conf, &forward.host).await else {
        output::warn(format!(
            "{} no longer resolves in the target; the connection was closed",
            forward.host
        ));
        return;
    };
    match client.connect_tcp(SocketAddr::new(ip, forward.port)).await {
        Ok(remote) => client.pipe(socket, remote).await,
        Err(error) => output::warn(format!(
            "cannot connect to {}:{} ({ip}) from the target: {error}; the connection was closed (is the server up?)",
            forward.host, forward.port
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(local: u16, host: &str, port: u16) -> Forward {
        Forward {
            local,
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn the_l_syntax() {
        assert_eq!(parse_forward("db:5432"), Ok(forward(5432, "db", 5432)));
        assert_eq!(
            parse_forward("15432:db.shop:5432"),
            Ok(forward(15432, "db.shop", 5432))
        );
        assert_eq!(
            parse_forward("0:10.1.2.3:80"),
            Ok(forward(0, "10.1.2.3", 80))
        );
        assert_eq!(
            parse_forward("[fd00::1]:80"),
            Ok(forward(80, "fd00::1", 80))
        );
        assert_eq!(
            parse_forward("8080:[fd00::1]:80"),
            Ok(forward(8080, "fd00::1", 80))
        );
        for bad in [
            "db", "db:0", "db:http", "x:db:80", ":80", "[db]:80", "1:2:3:4",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn search_domains_as_resolv_conf_orders_them() {
        let conf = TargetResolvConf {
            search: vec!["shop.svc.cluster.local".into(), "cluster.local".into()],
            options: vec!["ndots:2".into()],
        };
        assert_eq!(
            candidates("db", &conf),
            ["db.shop.svc.cluster.local", "db.cluster.local", "db"]
        );
        assert_eq!(
            candidates("db.shop.svc", &conf),
            [
                "db.shop.svc",
                "db.shop.svc.shop.svc.cluster.local",
                "db.shop.svc.cluster.local"
            ]
        );
        assert_eq!(candidates("db.example.", &conf), ["db.example"]);
    }
}
