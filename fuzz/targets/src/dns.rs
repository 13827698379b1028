//! DNS query parsing on both sides. The CLI's stub: a query as an app sends it (the first
//! input byte says UDP or TCP), its question read, an answer cached and taken back out, and
//! the response fitted to the client's size limit. The agent's resolver: the same bytes
//! answered as the pod's resolver would, from a hosts file and no nameserver (so nothing
//! leaves the machine): garbage gets FORMERR or nothing, the rest an answer or SERVFAIL.

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, rdata::A};
use mirrord_cli::dns::{Cache, fit, read_query};
use mirrord_dns::{DnsResolver, reply_to};

const HOSTS: &[u8] = b"10.0.0.5 db.default.svc.cluster.local db\n::1 localhost\n";

thread_local! {
    /// One runtime and resolver per thread: building them per input would drown the parsing.
    static AGENT: RefCell<Option<(tokio::runtime::Runtime, DnsResolver)>> = const { RefCell::new(None) };
}

pub fn run(data: &[u8]) {
    let Some((&mode, query)) = data.split_first() else {
        return;
    };
    stub(query, mode & 1 == 0);
    agent(query);
}

fn stub(query: &[u8], udp: bool) {
    let Some((request, question)) = read_query(query) else {
        return;
    };
    let mut response = reply_to(&request, ResponseCode::NoError);
    if let Some(asked) = request.queries.first() {
        let name: Name = asked.name().clone();
        response.answers.push(Record::from_rdata(
            name,
            30,
            RData::A(A(Ipv4Addr::new(10, 0, 0, 5))),
        ));
    }
    let mut cache = Cache::default();
    let now = Instant::now();
    cache.insert(question.clone(), &response, now);
    let cached = cache.get(&question, now + Duration::from_secs(1));
    let _ = fit(&request, cached.as_ref().unwrap_or(&response), udp);
}

fn agent(query: &[u8]) {
    AGENT.with(|agent| {
        let mut agent = agent.borrow_mut();
        if agent.is_none() {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let resolver = runtime.block_on(async { DnsResolver::new(None, Some(HOSTS)) });
            *agent = Some((runtime, resolver));
        }
        if let Some((runtime, resolver)) = agent.as_ref() {
            runtime.block_on(resolver.answer(query));
        }
    });
}
