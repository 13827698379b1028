//! Answers DNS query messages as a given resolver configuration would — the target's
//! `/etc/resolv.conf` and `/etc/hosts` in the agent, this machine's in the CLI for names kept
//! local. It never applies search domains (the querying resolver already expanded the name) and
//! never caches (the CLI's cache owns the TTLs), so every answer carries the TTLs the
//! nameserver gave.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::{Hosts, TokioResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

/// The DNS port, for both UDP and TCP.
pub const DNS_PORT: u16 = 53;

/// How long a query forwarded as is may take, per transport.
const RAW_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest UDP answer this side accepts from a nameserver (the EDNS size it advertises).
const MAX_UDP_ANSWER: usize = 4096;

/// A resolver built from one resolv.conf and one hosts file.
pub struct DnsResolver {
    resolver: TokioResolver,
    /// The nameservers of the resolv.conf, for queries the resolver API does not cover.
    nameservers: Vec<IpAddr>,
}

impl DnsResolver {
    /// Configured from the contents of a resolv.conf and a hosts file, either of which may be
    /// missing: without nameservers only the hosts file answers, everything else is SERVFAIL.
    /// Must run inside a Tokio runtime whose sockets are in the network to resolve in.
    pub fn new(resolv_conf: Option<&[u8]>, hosts: Option<&[u8]>) -> DnsResolver {
        let (config, mut options) = resolv_conf
            .and_then(|text| {
                hickory_resolver::system_conf::parse_resolv_conf(text)
                    .inspect_err(|error| tracing::debug!(%error, "unusable resolv.conf"))
                    .ok()
            })
            .unwrap_or_else(|| {
                (
                    ResolverConfig::from_name_servers(Vec::new()),
                    ResolverOpts::default(),
                )
            });
        let nameservers: Vec<IpAddr> = config.name_servers.iter().map(|ns| ns.ip).collect();
        // Only the hosts file given here, never the one of the process running this.
        options.use_hosts_file = ResolveHosts::Never;
        // The CLI caches with the nameserver's TTLs; a second cache here would stretch them.
        options.cache_size = 0;
        // Keep the CNAME chain in the answer, as a nameserver's own response has it.
        options.preserve_intermediates = true;
        let mut config = config;
        // The client's resolver expanded the name already; names arrive fully qualified.
        config.domain = None;
        config.search.clear();
        let mut resolver =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                .with_options(options)
                .build()
                .unwrap_or_else(|error| {
                    tracing::debug!(%error, "resolver configuration refused; using none");
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        TokioRuntimeProvider::default(),
                    )
                    .build()
                    // A configuration without nameservers has nothing the builder can refuse.
                    .expect("an empty resolver configuration builds")
                });
        let mut table = Hosts::default();
        if let Some(hosts) = hosts
            && let Err(error) = table.read_hosts_conf(hosts)
        {
            tracing::debug!(%error, "unusable hosts file");
        }
        resolver.set_hosts(Arc::new(table));
        DnsResolver {
            resolver,
            nameservers,
        }
    }

    /// This machine's resolver: `/etc/resolv.conf` and `/etc/hosts` as they are now.
    pub fn from_system() -> DnsResolver {
        let resolv_conf = std::fs::read("/etc/resolv.conf").ok();
        let hosts = std::fs::read("/etc/hosts").ok();
        DnsResolver::new(resolv_conf.as_deref(), hosts.as_deref())
    }

    /// The response to one query message, in wire format. Garbage gets FORMERR when it carries
    /// at least a message ID, and no answer at all otherwise.
    pub async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(request) => request,
            Err(error) => {
                tracing::debug!(%error, "undecodable DNS query");
                let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
        };
        let response = match covered_question(&request) {
            Some((name, record_type)) => {
                let outcome = self.resolver.lookup(name, record_type).await;
                respond(&request, outcome)
            }
            None => match self.forward(query).await {
                Some(raw) => return Some(raw),
                None => reply_to(&request, ResponseCode::ServFail),
            },
        };
        response
            .to_vec()
            .inspect_err(|error| tracing::debug!(%error, "cannot encode a DNS response"))
            .ok()
    }

    /// Sends the query as is to the first nameserver that answers, over UDP and then over TCP
    /// when the UDP answer was truncated.
    async fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        for &ip in &self.nameservers {
            let server = SocketAddr::new(ip, DNS_PORT);
            match forward_udp(server, query).await {
                Ok(answer) if !truncated(&answer) => return Some(answer),
                Ok(_) => match forward_tcp(server, query).await {
                    Ok(answer) => return Some(answer),
                    Err(error) => tracing::debug!(%server, %error, "raw DNS over TCP failed"),
                },
                Err(error) => tracing::debug!(%server, %error, "raw DNS over UDP failed"),
            }
        }
        None
    }
}

/// The question when it is one the resolver API answers: a standard query for one data record
/// type. Zone transfers, ANY and types unknown to the resolver are forwarded as they are.
fn covered_question(request: &Message) -> Option<(hickory_resolver::proto::rr::Name, RecordType)> {
    if request.metadata.op_code != OpCode::Query
        || request.metadata.message_type != MessageType::Query
    {
        return None;
    }
    let [query] = request.queries.as_slice() else {
        return None;
    };
    let record_type = query.query_type();
    let covered = !matches!(
        record_type,
        RecordType::ANY
            | RecordType::AXFR
            | RecordType::IXFR
            | RecordType::OPT
            | RecordType::Unknown(_)
            | RecordType::ZERO
    );
    covered.then(|| (query.name().clone(), record_type))
}

/// An empty response to `request` with `code`, echoing its question, ID and flags.
pub fn reply_to(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    response.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_ANSWER as u16);
        response.set_edns(edns);
    }
    response
}

/// The response a nameserver would have sent for `outcome`: the records found, or the negative
/// answer with its SOA (so the client can cache it), or the error code.
pub fn respond(
    request: &Message,
    outcome: Result<hickory_resolver::lookup::Lookup, NetError>,
) -> Message {
    match outcome {
        Ok(lookup) => {
            let mut response = reply_to(request, ResponseCode::NoError);
            response.answers = lookup.answers().to_vec();
            response.authorities = lookup.authorities().to_vec();
            response
                .additionals
                .extend(lookup.additionals().iter().cloned());
            response
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(no_records))) => {
            let mut response = reply_to(request, no_records.response_code);
            if let Some(soa) = no_records.soa {
                response.authorities.push(soa.into_record_of_rdata());
            }
            response
        }
        Err(NetError::Dns(DnsError::ResponseCode(code))) => reply_to(request, code),
        Err(error) => {
            tracing::debug!(%error, "lookup failed");
            reply_to(request, ResponseCode::ServFail)
        }
    }
}

/// Whether a response message has its TC bit set (RFC 1035 §4.1.1: bit 1 of byte 2).
fn truncated(message: &[u8]) -> bool {
    message.get(2).is_some_and(|flags| flags & 0x02 != 0)
}

async fn forward_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut answer = vec![0u8; MAX_UDP_ANSWER];
    loop {
        let len = timeout(RAW_TIMEOUT, socket.recv(&mut answer))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        // A datagram with another ID is a stray; keep waiting for ours.
        if len >= 2 && answer[..2] == query[..2.min(query.len())] {
            answer.truncate(len);
            return Ok(answer);
        }
    }
}

async fn forward_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        let len = u16::try_from(query.len())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(query).await?;
        let len = stream.read_u16().await?;
        let mut answer = vec![0u8; usize::from(len)];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    };
    timeout(RAW_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::{Name, RData};
    use std::str::FromStr;

    fn query(name: &str, record_type: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 4242;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_str(name).unwrap(), record_type));
        message.to_vec().unwrap()
    }

    async fn ask(resolver: &DnsResolver, query: &[u8]) -> Message {
        Message::from_vec(&resolver.answer(query).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn the_hosts_file_answers_with_the_queries_id() {
        let resolver = DnsResolver::new(
            None,
            Some(b"# pod\n10.1.2.3 web.default.svc.cluster.local web\n"),
        );
        let response = ask(
            &resolver,
            &query("web.default.svc.cluster.local.", RecordType::A),
        )
        .await;
        assert_eq!(response.metadata.id, 4242);
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert!(response.metadata.recursion_available);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        let addresses: Vec<_> = response
            .answers
            .iter()
            .map(|record| record.data.clone())
            .collect();
        assert_eq!(addresses, vec![RData::A("10.1.2.3".parse().unwrap())]);
    }

    #[tokio::test]
    async fn without_nameservers_other_names_fail_as_servfail() {
        let resolver = DnsResolver::new(Some(b"search cluster.local\n"), None);
        let response = ask(&resolver, &query("db.cluster.local.", RecordType::A)).await;
        assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(response.queries.len(), 1, "the question is echoed");
        let any = ask(&resolver, &query("db.cluster.local.", RecordType::ANY)).await;
        assert_eq!(any.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn garbage_gets_formerr_when_it_has_an_id() {
        let resolver = DnsResolver::new(None, None);
        let response = ask(&resolver, &[0x12, 0x34, 0xff]).await;
        assert_eq!(response.metadata.id, 0x1234);
        assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(resolver.answer(&[7]).await, None);
    }
}
