//! The launched process's DNS: a generated resolv.conf naming a stub on a virtual address, and
//! the stub the netstack feeds, which answers each query from its cache, from the target's
//! resolver through the agent, or — for names the user keeps local — from this machine's
//! resolver. It never serves an answer past its TTL and never touches this machine's own
//! resolver configuration.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use mirrord_dns::{DnsResolver, reply_to};
use mirrord_netstack::{NewTcp, UdpFlow};
use mirrord_protocol::{Request, Response};
use mirrord_routing::SharedRules;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{DNSClass, RData, Record, RecordType};

use crate::client::{AgentClient, lock};
use crate::net::{HOST_LOOPBACK, HOST_LOOPBACK_NAME};

/// The stub's address inside the launched process's network namespace, next to
/// [`crate::net::HOST_LOOPBACK`] in the benchmarking range no cluster hands out.
pub const STUB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 253);

/// The DNS port the stub answers on, over UDP and TCP.
pub const STUB_PORT: u16 = mirrord_dns::DNS_PORT;

/// A UDP answer to a query without EDNS must fit in this (RFC 1035 §4.2.1).
const CLASSIC_UDP_LIMIT: usize = 512;

/// Largest UDP answer sent even when a client's EDNS allows more (the DNS flag day's size,
/// which no fragmentation can break).
const MAX_UDP_ANSWER: usize = 1232;

/// Entries the cache holds before it drops everything expired (then everything).
const CACHE_CAPACITY: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "feature.network.dns.filter entry {0:?}: expected a host name (\"db\", \"api.example.com\") or a suffix pattern (\"*.example.com\")"
    )]
    FilterEntry(String),
}

/// `feature.network.dns.filter`: which names resolve on this machine instead of the target.
#[derive(Debug, Clone, PartialEq)]
pub enum NameRule {
    /// Only these resolve here.
    Local(Vec<String>),
    /// Only these resolve in the target; everything else here.
    Remote(Vec<String>),
}

/// What the user asked of DNS.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsSettings {
    /// False with `--no-dns` or `"dns": false`: the command keeps this machine's resolv.conf.
    pub enabled: bool,
    pub rule: Option<NameRule>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            rule: None,
        }
    }
}

/// A parsed [`NameRule`].
#[derive(Debug, Clone, PartialEq)]
pub struct NameFilter {
    patterns: Vec<Pattern>,
    /// Whether the listed names are the local ones (`local`) or the only remote ones.
    listed_are_local: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    /// A name as the target would resolve it: itself, or expanded by a search domain.
    Name(String),
    /// `*.example.com`, stored as `.example.com`: every name below it.
    Suffix(String),
}

impl NameFilter {
    pub fn parse(rule: &NameRule) -> Result<NameFilter, DnsError> {
        let (entries, listed_are_local) = match rule {
            NameRule::Local(entries) => (entries, true),
            NameRule::Remote(entries) => (entries, false),
        };
        let patterns = entries
            .iter()
            .map(|entry| {
                let (suffix, name) = match entry.strip_prefix("*.") {
                    Some(rest) => (true, rest),
                    None => (false, entry.as_str()),
                };
                let name = normalize(name);
                let valid = !name.is_empty()
                    && name
                        .split('.')
                        .all(|label| !label.is_empty() && label.len() <= 63)
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
                match (valid, suffix) {
                    (false, _) => Err(DnsError::FilterEntry(entry.clone())),
                    (true, true) => Ok(Pattern::Suffix(format!(".{name}"))),
                    (true, false) => Ok(Pattern::Name(name)),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(NameFilter {
            patterns,
            listed_are_local,
        })
    }

    /// Whether `name` (normalized) is resolved on this machine.
    pub fn is_local(&self, name: &str, search: &[String]) -> bool {
        let listed = self.patterns.iter().any(|pattern| match pattern {
            Pattern::Name(listed) => names_match(listed, name, search),
            Pattern::Suffix(suffix) => name.ends_with(suffix.as_str()),
        });
        listed == self.listed_are_local
    }
}

/// Lowercase, without the root's trailing dot: how names are compared here.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether the query for `queried` is a lookup of `written` as the target's resolver would
/// expand it: the name itself, or the name in one of the search domains.
fn names_match(written: &str, queried: &str, search: &[String]) -> bool {
    queried == written
        || search.iter().any(|domain| {
            queried
                .strip_prefix(written)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|rest| rest == domain)
        })
}

/// The target's resolv.conf, reduced to what the stub needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetResolvConf {
    /// Search domains, normalized, in order.
    pub search: Vec<String>,
    /// `options` lines, verbatim (ndots, timeout, attempts…).
    pub options: Vec<String>,
}

impl TargetResolvConf {
    /// Reads it as resolv.conf(5) does: the last `search` or `domain` line wins.
    pub fn parse(text: &str) -> TargetResolvConf {
        let mut conf = TargetResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("search" | "domain") => {
                    conf.search = words
                        .take_while(|word| !word.starts_with(['#', ';']))
                        .map(normalize)
                        .filter(|domain| !domain.is_empty())
                        .collect();
                }
                Some("options") => conf.options.push(line.trim().to_owned()),
                _ => {}
            }
        }
        conf
    }

    /// The command's resolv.conf: the stub as its only nameserver, the target's search domains
    /// and options, so short names expand exactly as in the target.
    pub fn render(&self) -> String {
        let mut text = format!(
            "# Generated by mirrord: names resolve as in the target, through mirrord's DNS stub.\nnameserver {STUB_ADDR}\n"
        );
        if !self.search.is_empty() {
            text.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        for options in &self.options {
            text.push_str(options);
            text.push('\n');
        }
        text
    }
}

/// Reads the target's resolv.conf through the agent; an empty one when it has none.
pub async fn target_resolv_conf(client: &AgentClient) -> TargetResolvConf {
    match client.read_small_file("/etc/resolv.conf").await {
        Ok(data) => TargetResolvConf::parse(&String::from_utf8_lossy(&data)),
        Err(error) => {
            tracing::debug!(%error, "the target has no readable resolv.conf");
            TargetResolvConf::default()
        }
    }
}

/// Cache key: the question, with the name normalized.
pub type Question = (String, RecordType, DNSClass);

/// A client's query as the stub takes it: the message and its one question, normalized. None
/// for what is not a DNS message, or asks no question or several (those go to the target's
/// resolver as they are).
pub fn read_query(query: &[u8]) -> Option<(Message, Question)> {
    let request = Message::from_vec(query).ok()?;
    let question = match request.queries.as_slice() {
        [query] => (
            normalize(&query.name().to_ascii()),
            query.query_type(),
            query.query_class(),
        ),
        _ => return None,
    };
    Some((request, question))
}

/// The response's bytes for the client: over UDP (`udp`) one too big for the client's limit
/// (its EDNS size, within what the stub sends) comes back truncated, so the client retries
/// over TCP (RFC 7766).
pub fn fit(request: &Message, response: &Message, udp: bool) -> Option<Vec<u8>> {
    let limit = if udp {
        let asked = request
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP_LIMIT, |edns| usize::from(edns.max_payload()));
        asked.clamp(CLASSIC_UDP_LIMIT, MAX_UDP_ANSWER)
    } else {
        usize::from(u16::MAX)
    };
    let bytes = response.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    response.truncate().to_vec().ok()
}

/// The target's answer to `request` as the client gets it: SERVFAIL when there is none or it
/// is no DNS message (garbage, cut short), and without the records [`drop_this_machine`]
/// removes (said once in a warning line).
pub fn target_response(request: &Message, question: &Question, raw: Option<&[u8]>) -> Message {
    let Some(Ok(mut response)) = raw.map(Message::from_vec) else {
        return reply_to(request, ResponseCode::ServFail);
    };
    let dropped = drop_this_machine(&mut response);
    if !dropped.is_empty() {
        tracing::warn!(
            "the target's DNS answered {} with {dropped:?}, which would reach this machine's \
             loopback; dropped (only {HOST_LOOPBACK_NAME} leads there)",
            question.0
        );
    }
    response
}

/// Removes the address records of a target's answer that name [`HOST_LOOPBACK`] (also as an
/// IPv4-mapped IPv6 address), the launched process's way to this machine's loopback: a pod's DNS
/// must not send the process to the developer's own services under a cluster name. Only
/// [`HOST_LOOPBACK_NAME`] (in the process's `/etc/hosts`) leads there. Loopback answers
/// (`127.0.0.0/8`, `::1`) stay: they reach the process's own network namespace, as they reach
/// the pod's in the pod, never this machine's. Returns the addresses removed.
pub fn drop_this_machine(response: &mut Message) -> Vec<IpAddr> {
    let reaches_here = |record: &Record| match &record.data {
        RData::A(a) => (a.0 == HOST_LOOPBACK).then_some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => {
            (aaaa.0.to_ipv4_mapped() == Some(HOST_LOOPBACK)).then_some(IpAddr::V6(aaaa.0))
        }
        _ => None,
    };
    let mut dropped = Vec::new();
    for records in [&mut response.answers, &mut response.additionals] {
        records.retain(|record| match reaches_here(record) {
            Some(ip) => {
                dropped.push(ip);
                false
            }
            None => true,
        });
    }
    dropped
}

/// Answers by question, each until its TTL runs out (negative ones for their SOA's negative
/// TTL, RFC 2308). Time is passed in, so expiry is tested without waiting.
#[derive(Default)]
pub struct Cache {
    entries: HashMap<Question, CachedAnswer>,
}

struct CachedAnswer {
    response: Message,
    stored: Instant,
    ttl: Duration,
}

impl Cache {
    /// Keeps `response` for as long as its own TTLs allow; nothing when they allow nothing.
    pub fn insert(&mut self, question: Question, response: &Message, now: Instant) {
        let Some(ttl) = cacheable_ttl(response) else {
            return;
        };
        if self.entries.len() >= CACHE_CAPACITY {
            self.entries
                .retain(|_, entry| now.duration_since(entry.stored) < entry.ttl);
            if self.entries.len() >= CACHE_CAPACITY {
                self.entries.clear();
            }
        }
        self.entries.insert(
            question,
            CachedAnswer {
                response: response.clone(),
                stored: now,
                ttl: Duration::from_secs(u64::from(ttl)),
            },
        );
    }

    /// The cached response with every TTL lowered by the time it spent here; None once expired.
    pub fn get(&mut self, question: &Question, now: Instant) -> Option<Message> {
        let entry = self.entries.get(question)?;
        let age = now.duration_since(entry.stored);
        if age >= entry.ttl {
            self.entries.remove(question);
            return None;
        }
        let age = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        let mut response = entry.response.clone();
        let sections = [
            &mut response.answers,
            &mut response.authorities,
            &mut response.additionals,
        ];
        for record in sections.into_iter().flatten() {
            record.ttl = record.ttl.saturating_sub(age);
        }
        Some(response)
    }
}

/// How long a response may be reused: the smallest TTL of its answers, or for a negative
/// answer the SOA's negative TTL. None for errors and answers that say nothing of it.
fn cacheable_ttl(response: &Message) -> Option<u32> {
    let ttl = match response.metadata.response_code {
        ResponseCode::NoError if !response.answers.is_empty() => {
            response.answers.iter().map(|record| record.ttl).min()
        }
        ResponseCode::NoError | ResponseCode::NXDomain => {
            response
                .authorities
                .iter()
                .find_map(|record| match &record.data {
                    RData::SOA(soa) => Some(record.ttl.min(soa.minimum)),
                    _ => None,
                })
        }
        _ => None,
    };
    ttl.filter(|&ttl| ttl > 0)
}

/// What an answer taught about names of the outgoing filter: their addresses, by family, so an
/// A answer and an AAAA answer add up instead of replacing each other.
#[derive(Default)]
struct Learned {
    v4: HashMap<String, Vec<IpAddr>>,
    v6: HashMap<String, Vec<IpAddr>>,
}

/// The DNS stub of one session.
pub struct DnsStub {
    client: Arc<AgentClient>,
    filter: Option<NameFilter>,
    search: Vec<String>,
    /// This machine's resolver, for local names; built on first use.
    local: tokio::sync::OnceCell<DnsResolver>,
    cache: Mutex<Cache>,
    rules: SharedRules,
    /// Names of the outgoing filter, normalized.
    filter_names: Vec<String>,
    learned: Mutex<Learned>,
}

impl DnsStub {
    pub fn new(
        client: Arc<AgentClient>,
        filter: Option<NameFilter>,
        conf: &TargetResolvConf,
        rules: SharedRules,
    ) -> DnsStub {
        let filter_names = rules.names().iter().map(|name| normalize(name)).collect();
        DnsStub {
            client,
            filter,
            search: conf.search.clone(),
            local: tokio::sync::OnceCell::new(),
            cache: Mutex::new(Cache::default()),
            rules,
            filter_names,
            learned: Mutex::new(Learned::default()),
        }
    }

    /// The response to one query message; over UDP (`udp`) one too big for the client's limit
    /// comes back truncated, so the client retries over TCP.
    pub async fn answer(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        // The target's resolver answers garbage as a nameserver would (FORMERR), and questions
        // this stub does not cache as it would.
        let Some((request, question)) = read_query(query) else {
            return self.remote(query).await;
        };
        let cached = lock(&self.cache).get(&question, Instant::now());
        let response = match cached {
            Some(cached) => {
                let mut response = reply_to(&request, cached.metadata.response_code);
                response.answers = cached.answers;
                response.authorities = cached.authorities;
                response.additionals = cached.additionals;
                response
            }
            None => {
                let local = self
                    .filter
                    .as_ref()
                    .is_some_and(|filter| filter.is_local(&question.0, &self.search));
                let raw = if local {
                    let resolver = self
                        .local
                        .get_or_init(|| async { DnsResolver::from_system() });
                    resolver.await.answer(query).await
                } else {
                    self.remote(query).await
                };
                let response = if local {
                    match raw.as_deref().map(Message::from_vec) {
                        Some(Ok(response)) => response,
                        _ => reply_to(&request, ResponseCode::ServFail),
                    }
                } else {
                    target_response(&request, &question, raw.as_deref())
                };
                lock(&self.cache).insert(question.clone(), &response, Instant::now());
                response
            }
        };
        self.learn(&question, &response);
        fit(&request, &response, udp)
    }

    /// The target's answer through the agent; None when the agent cannot be asked.
    async fn remote(&self, query: &[u8]) -> Option<Vec<u8>> {
        match self.client.request(Request::Dns(query.to_vec())).await {
            Ok(Response::Dns(answer)) if !answer.is_empty() => Some(answer),
            Ok(_) => None,
            Err(error) => {
                tracing::debug!(%error, "remote DNS query failed");
                None
            }
        }
    }

    /// Feeds the outgoing filter: an address a filter name resolved to now matches the name.
    fn learn(&self, question: &Question, response: &Message) {
        let (name, record_type, _) = question;
        let family = match record_type {
            RecordType::A => 4,
            RecordType::AAAA => 6,
            _ => return,
        };
        let Some(filter_name) = self
            .filter_names
            .iter()
            .find(|written| names_match(written, name, &self.search))
        else {
            return;
        };
        let addrs: Vec<IpAddr> = response
            .answers
            .iter()
            .filter_map(|record: &Record| match &record.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect();
        let mut learned = lock(&self.learned);
        let by_family = if family == 4 {
            &mut learned.v4
        } else {
            &mut learned.v6
        };
        by_family.insert(filter_name.clone(), addrs);
        let all: Vec<IpAddr> = [&learned.v4, &learned.v6]
            .into_iter()
            .filter_map(|map| map.get(filter_name))
            .flatten()
            .copied()
            .collect();
        self.rules.learn(filter_name, &all);
    }

    /// Answers the datagrams of one UDP flow to the stub, each as soon as it is resolved (a
    /// resolver asks for A and AAAA at once on one socket). The answers are polled right here,
    /// not in tasks of their own: every hand-over between tasks can cost a thread wake-up.
    pub async fn serve_udp(self: Arc<Self>, mut flow: UdpFlow) {
        let mut pending = FuturesUnordered::new();
        loop {
            tokio::select! {
                query = flow.recv() => {
                    let Some(query) = query else { return };
                    let stub = self.clone();
                    pending.push(async move { stub.answer(&query, true).await });
                }
                Some(answer) = pending.next(), if !pending.is_empty() => {
                    let Some(answer) = answer else { continue };
                    if let Err(error) = flow.send(&answer) {
                        tracing::debug!(%error, "the DNS client's flow is gone");
                        return;
                    }
                }
            }
        }
    }

    /// Answers length-prefixed queries on one TCP connection to the stub, in order.
    pub async fn serve_tcp(self: Arc<Self>, new: NewTcp) {
        let Ok(mut stream) = new.accept() else {
            return;
        };
        loop {
            let Ok(len) = stream.read_u16().await else {
                return;
            };
            let mut query = vec![0u8; usize::from(len)];
            if stream.read_exact(&mut query).await.is_err() {
                return;
            }
            let Some(answer) = self.answer(&query, false).await else {
                // Nothing to say to garbage: close, as a nameserver does.
                return;
            };
            let Ok(len) = u16::try_from(answer.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&answer);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::{OpCode, Query};
    use hickory_resolver::proto::rr::Name;
    use hickory_resolver::proto::rr::rdata::{A, AAAA, SOA};
    use std::str::FromStr;

    fn search() -> Vec<String> {
        vec![
            "default.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ]
    }

    #[test]
    fn local_rule_matches_names_as_the_target_expands_them() {
        let filter = NameFilter::parse(&NameRule::Local(vec![
            "laptop.test".into(),
            "web".into(),
            "*.corp.example".into(),
        ]))
        .unwrap();
        let local = |name: &str| filter.is_local(name, &search());
        assert!(local("laptop.test"));
        assert!(local("web"));
        assert!(local("web.default.svc.cluster.local"));
        assert!(local("web.cluster.local"));
        assert!(local("git.corp.example"));
        assert!(
            !local("corp.example"),
            "a suffix pattern is below the name only"
        );
        assert!(!local("web.other.svc.cluster.local"));
        assert!(!local("webx.default.svc.cluster.local"));
        assert!(!local("db.default.svc.cluster.local"));
    }

    #[test]
    fn remote_rule_keeps_everything_else_local() {
        let filter = NameFilter::parse(&NameRule::Remote(vec!["DB.".into()])).unwrap();
        assert!(!filter.is_local("db.default.svc.cluster.local", &search()));
        assert!(filter.is_local("github.com", &search()));
    }

    #[test]
    fn filter_entries_that_are_not_names_are_refused() {
        for entry in ["", "*.", "10.0.0.0/8", "db:5432", "a..b", "*"] {
            let error = NameFilter::parse(&NameRule::Local(vec![entry.into()])).unwrap_err();
            assert!(
                error.to_string().contains("expected a host name"),
                "{entry}"
            );
        }
    }

    #[test]
    fn resolv_conf_keeps_the_targets_search_and_options() {
        let conf = TargetResolvConf::parse(
            "# kubelet\nnameserver 10.96.0.10\nsearch first.local\nsearch default.svc.cluster.local svc.cluster.local cluster.local.\noptions ndots:5\noptions timeout:2\n",
        );
        assert_eq!(conf.search, search());
        assert_eq!(
            conf.render(),
            format!(
                "# Generated by mirrord: names resolve as in the target, through mirrord's DNS stub.\nnameserver {STUB_ADDR}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\noptions timeout:2\n"
            )
        );
        assert_eq!(
            TargetResolvConf::parse("").render().lines().nth(1),
            Some("nameserver 198.19.255.253")
        );
    }

    fn question(name: &str, record_type: RecordType) -> Question {
        (name.into(), record_type, DNSClass::IN)
    }

    fn response(code: ResponseCode) -> Message {
        let mut message = Message::error_msg(7, OpCode::Query, code);
        message.add_query(Query::query(
            Name::from_str("web.default.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        message
    }

    fn a_record(ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_str("web.default.svc.cluster.local.").unwrap(),
            ttl,
            RData::A(A::new(10, 0, 0, 1)),
        )
    }

    fn soa_record(ttl: u32, minimum: u32) -> Record {
        let soa = SOA::new(
            Name::from_str("ns.cluster.local.").unwrap(),
            Name::from_str("admin.cluster.local.").unwrap(),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        Record::from_rdata(
            Name::from_str("cluster.local.").unwrap(),
            ttl,
            RData::SOA(soa),
        )
    }

    fn record(data: RData) -> Record {
        Record::from_rdata(Name::from_str("db.default.svc.").unwrap(), 30, data)
    }

    #[test]
    fn target_answers_never_lead_to_this_machine() {
        let mapped = HOST_LOOPBACK.to_ipv6_mapped();
        let mut answer = response(ResponseCode::NoError);
        answer.answers = vec![
            record(RData::A(A(HOST_LOOPBACK))),
            record(RData::A(A::new(10, 0, 0, 1))),
            record(RData::A(A::new(127, 0, 0, 1))),
            record(RData::AAAA(AAAA(mapped))),
            record(RData::AAAA(AAAA(std::net::Ipv6Addr::LOCALHOST))),
        ];
        answer.additionals.push(record(RData::A(A(HOST_LOOPBACK))));
        let request = response(ResponseCode::NoError);
        let q = question("db.default.svc", RecordType::A);
        let got = target_response(&request, &q, Some(&answer.to_vec().unwrap()));
        let kept: Vec<&RData> = got.answers.iter().map(|r| &r.data).collect();
        assert_eq!(
            kept,
            [
                &RData::A(A::new(10, 0, 0, 1)),
                &RData::A(A::new(127, 0, 0, 1)),
                &RData::AAAA(AAAA(std::net::Ipv6Addr::LOCALHOST)),
            ]
        );
        assert!(got.additionals.is_empty());
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            drop_this_machine(&mut answer),
            [
                IpAddr::V4(HOST_LOOPBACK),
                IpAddr::V6(mapped),
                IpAddr::V4(HOST_LOOPBACK)
            ]
        );
    }

    #[test]
    fn malformed_target_answers_are_servfail() {
        let request = response(ResponseCode::NoError);
        let q = question("web.default.svc.cluster.local", RecordType::A);
        let mut good = response(ResponseCode::NoError);
        good.answers = vec![a_record(30); 3];
        let bytes = good.to_vec().unwrap();
        let servfail = |raw: Option<&[u8]>| {
            target_response(&request, &q, raw).metadata.response_code == ResponseCode::ServFail
        };
        assert!(servfail(None), "no answer at all");
        assert!(servfail(Some(&[])), "an empty one");
        assert!(servfail(Some(&bytes[..5])), "a header cut short");
        assert!(
            servfail(Some(&bytes[..bytes.len() - 3])),
            "a record cut short"
        );
        let mut lying = bytes.clone();
        lying[7] = 200; // ANCOUNT claims 200 answers; three follow
        assert!(servfail(Some(&lying)), "counts past the end");
        assert!(!servfail(Some(&bytes)));
    }

    #[test]
    fn oversized_answers_are_truncated_over_udp_and_whole_over_tcp() {
        let request = response(ResponseCode::NoError);
        let mut big = response(ResponseCode::NoError);
        big.answers = (0..=255u8)
            .map(|i| record(RData::A(A::new(10, 1, 0, i))))
            .collect();
        let udp = fit(&request, &big, true).unwrap();
        assert!(udp.len() <= CLASSIC_UDP_LIMIT, "{}", udp.len());
        assert!(Message::from_vec(&udp).unwrap().metadata.truncation);
        let tcp = Message::from_vec(&fit(&request, &big, false).unwrap()).unwrap();
        assert_eq!(tcp.answers.len(), 256);
        assert!(!tcp.metadata.truncation);
    }

    #[test]
    fn cached_answers_age_and_expire_with_their_ttl() {
        let mut cache = Cache::default();
        let start = Instant::now();
        let mut positive = response(ResponseCode::NoError);
        positive.answers = vec![a_record(30), a_record(10)];
        let key = question("web.default.svc.cluster.local", RecordType::A);
        cache.insert(key.clone(), &positive, start);
        let aged = cache.get(&key, start + Duration::from_secs(4)).unwrap();
        assert_eq!(
            aged.answers.iter().map(|r| r.ttl).collect::<Vec<_>>(),
            vec![26, 6]
        );
        assert!(
            cache.get(&key, start + Duration::from_secs(10)).is_none(),
            "nothing is served past the smallest TTL"
        );
    }

    #[test]
    fn negative_answers_are_cached_for_the_soa_negative_ttl() {
        let mut cache = Cache::default();
        let start = Instant::now();
        let mut nxdomain = response(ResponseCode::NXDomain);
        nxdomain.authorities = vec![soa_record(300, 5)];
        let key = question("nope.cluster.local", RecordType::A);
        cache.insert(key.clone(), &nxdomain, start);
        let hit = cache.get(&key, start + Duration::from_secs(4)).unwrap();
        assert_eq!(hit.metadata.response_code, ResponseCode::NXDomain);
        assert!(cache.get(&key, start + Duration::from_secs(5)).is_none());
    }

    #[test]
    fn failures_and_zero_ttls_are_not_cached() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let servfail = response(ResponseCode::ServFail);
        let mut zero = response(ResponseCode::NoError);
        zero.answers = vec![a_record(0)];
        let no_soa = response(ResponseCode::NXDomain);
        for (name, message) in [("a", &servfail), ("b", &zero), ("c", &no_soa)] {
            let key = question(name, RecordType::A);
            cache.insert(key.clone(), message, now);
            assert!(cache.get(&key, now).is_none(), "{name}");
        }
    }
}
