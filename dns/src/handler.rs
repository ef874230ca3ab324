//! [`ClusterDns`]: one request in, one response out.
//!
//! Checks (in order): a message that is a response, or too short to carry a
//! header, is dropped (never answered: no reflection loops); one that does
//! not parse gets FORMERR; an opcode other than QUERY gets NOTIMP; a question
//! count other than 1 gets FORMERR; EDNS version > 0 gets BADVERS; a class
//! other than IN, and zone transfers (AXFR/IXFR), get REFUSED.
//!
//! Then: names in the cluster zone are answered from the current snapshot
//! (synchronously, no await: the UDP loop answers them inline); PTR
//! questions for addresses the cluster knows likewise; the rest goes to the
//! forwarder. A query for `X.<ns>.svc.<zone>` from a pod of namespace `<ns>`
//! that does not exist is the first step of the search path `ndots:5`
//! produces: the server walks the remaining steps itself and answers the
//! first name that exists with a CNAME to it (server-side search path).

use crate::forward::Forwarder;
use crate::zone::{self, Answer, Snapshot};
use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The largest UDP payload the server sends (DNS flag day 2020: 1232 avoids
/// fragmentation on any path) unless the client asks for less.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// How deep a CNAME chain (ExternalName to a name in the zone …) is followed.
const MAX_CHAIN: usize = 8;

/// Which transport a request came over (UDP answers are size-limited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Counters, for metrics and `netctl`.
#[derive(Debug, Default)]
pub struct DnsStats {
    pub queries: AtomicU64,
    pub answered_locally: AtomicU64,
    pub forwarded: AtomicU64,
    pub search_path_hits: AtomicU64,
    pub nxdomain: AtomicU64,
    pub servfail: AtomicU64,
    pub formerr: AtomicU64,
    pub notimp: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
    pub truncated: AtomicU64,
}

/// What to do with a request.
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing (not a query, or not even a header).
    Drop,
    /// Needs the forwarder: finish with [`ClusterDns::finish`].
    Pending(Box<Pending>),
}

/// A parsed request waiting for upstream answers, with what the zone
/// already decided about it.
pub struct Pending {
    request: Message,
    transport: Transport,
    step: Upstream,
}

/// What a pending request needs from the upstreams.
enum Upstream {
    /// The zone's answer ends in a CNAME to a name outside the zone.
    Chase(Answer),
    /// The rest of a pod's search path.
    SearchPath,
    /// Not a cluster name at all.
    Forward,
}

/// The cluster DNS request handler.
#[derive(Debug)]
pub struct ClusterDns {
    snapshot: ArcSwap<Snapshot>,
    forwarder: Option<Arc<Forwarder>>,
    /// The node's own search domains (from its resolv.conf): the tail of a
    /// pod's search path, after the cluster's three.
    host_search: Vec<Name>,
    pub stats: DnsStats,
}

impl ClusterDns {
    pub fn new(
        snapshot: Snapshot,
        forwarder: Option<Arc<Forwarder>>,
        host_search: Vec<Name>,
    ) -> Self {
        ClusterDns {
            snapshot: ArcSwap::from_pointee(snapshot),
            forwarder,
            host_search,
            stats: DnsStats::default(),
        }
    }

    /// The snapshot queries are answered from now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Publish a new snapshot: queries that start after this see it.
    pub fn publish(&self, s: Snapshot) {
        self.snapshot.store(Arc::new(s));
    }

    pub fn forwarder(&self) -> Option<&Arc<Forwarder>> {
        self.forwarder.as_ref()
    }

    /// Everything that can be decided without waiting: the answer for a
    /// cluster name, an error, or `Pending` for the forwarder.
    pub fn respond_now(&self, raw: &[u8], src: IpAddr, transport: Transport) -> Outcome {
        self.stats.queries.fetch_add(1, Relaxed);
        // Header: id(2) flags(2) counts(8). QR set = a response: never answer.
        if raw.len() < 12 || raw[2] & 0x80 != 0 {
            self.stats.dropped.fetch_add(1, Relaxed);
            return Outcome::Drop;
        }
        let id = u16::from_be_bytes([raw[0], raw[1]]);
        let opcode = (raw[2] >> 3) & 0x0f;
        let rd = raw[2] & 0x01 != 0;
        let request = match Message::from_vec(raw) {
            Ok(m) => m,
            Err(_) => {
                let code = if opcode != 0 {
                    ResponseCode::NotImp
                } else {
                    ResponseCode::FormErr
                };
                return Outcome::Reply(self.bare_error(id, opcode, rd, code));
            }
        };
        if request.metadata.op_code != OpCode::Query {
            return Outcome::Reply(self.error(&request, ResponseCode::NotImp, transport));
        }
        if request.queries.len() != 1 {
            return Outcome::Reply(self.error(&request, ResponseCode::FormErr, transport));
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Outcome::Reply(self.error(&request, ResponseCode::BADVERS, transport));
        }
        let q = &request.queries[0];
        if q.query_class() != DNSClass::IN
            || matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR)
        {
            return Outcome::Reply(self.error(&request, ResponseCode::Refused, transport));
        }
        let snap = self.snapshot.load();
        let (qname, qtype) = (q.name(), q.query_type());
        let step = match self.local(&snap, qname, qtype, src) {
            Local::Done(answer) => {
                self.stats.answered_locally.fetch_add(1, Relaxed);
                return Outcome::Reply(self.encode(&request, answer, transport));
            }
            Local::Upstream(step) => step,
        };
        if self.forwarder.is_some() {
            return Outcome::Pending(Box::new(Pending {
                request,
                transport,
                step,
            }));
        }
        // No upstreams: what the zone alone can say.
        let answer = match step {
            // The CNAME alone.
            Upstream::Chase(mut a) => {
                a.chase = None;
                a
            }
            Upstream::SearchPath => self.search_path_in_zone(&snap, qname, qtype),
            Upstream::Forward => {
                return Outcome::Reply(self.error(&request, ResponseCode::Refused, transport))
            }
        };
        Outcome::Reply(self.encode(&request, answer, transport))
    }

    /// Finish a pending request (forwarding, chasing, or walking the search
    /// path through the upstreams).
    pub async fn finish(&self, p: Box<Pending>) -> Vec<u8> {
        let q = &p.request.queries[0];
        let snap = self.snapshot.load_full();
        let answer = match p.step {
            Upstream::Chase(a) => self.chase(&snap, a, q.query_type(), &p.request).await,
            Upstream::SearchPath => self.search_path(&snap, q, &p.request).await,
            Upstream::Forward => {
                self.stats.forwarded.fetch_add(1, Relaxed);
                let Some(fwd) = &self.forwarder else {
                    return self.error(&p.request, ResponseCode::Refused, p.transport);
                };
                let resp = fwd.forward(&p.request).await;
                return self.encode_forwarded(&p.request, resp, p.transport);
            }
        };
        self.encode(&p.request, answer, p.transport)
    }

    /// SERVFAIL for a pending request the server has no room for (too many
    /// already wait for the upstreams): at once, never queued.
    pub fn busy(&self, p: Box<Pending>) -> Vec<u8> {
        self.error(&p.request, ResponseCode::ServFail, p.transport)
    }

    /// Answer raw bytes completely (the forwarder awaited if needed).
    pub async fn respond(&self, raw: &[u8], src: IpAddr, transport: Transport) -> Option<Vec<u8>> {
        match self.respond_now(raw, src, transport) {
            Outcome::Reply(b) => Some(b),
            Outcome::Drop => None,
            Outcome::Pending(p) => Some(self.finish(p).await),
        }
    }

    fn local(&self, snap: &Snapshot, name: &Name, qtype: RecordType, src: IpAddr) -> Local {
        if zone::in_zone(&snap.config, name) {
            let a = snap.lookup(name, qtype);
            if a.rcode == ResponseCode::NXDomain && self.search_path_applies(snap, name, src) {
                return Local::Upstream(Upstream::SearchPath);
            }
            let a = chase_in_zone(snap, a, qtype);
            if a.chase.is_some() {
                return Local::Upstream(Upstream::Chase(a));
            }
            return Local::Done(a);
        }
        if let Some(a) = snap.lookup_reverse(name, qtype) {
            return Local::Done(a);
        }
        Local::Upstream(Upstream::Forward)
    }

    /// `X.<ns>.svc.<zone>` asked by a pod of `<ns>`, X not empty.
    fn search_path_applies(&self, snap: &Snapshot, name: &Name, src: IpAddr) -> bool {
        let Some(ns) = snap.pod_namespace(src) else {
            return false;
        };
        let zone_labels = snap.config.zone.num_labels() as usize;
        let total = name.num_labels() as usize;
        if total < zone_labels + 3 {
            return false;
        }
        let mut labels = name.iter().skip(total - zone_labels - 2);
        let (Some(l_ns), Some(l_svc)) = (labels.next(), labels.next()) else {
            return false;
        };
        l_svc.eq_ignore_ascii_case(b"svc") && l_ns.eq_ignore_ascii_case(ns.as_bytes())
    }

    /// The names a pod's resolver would try after `X.<ns>.svc.<zone>`:
    /// `X.svc.<zone>`, `X.<zone>`, `X.<host search>…`, then `X` itself.
    fn search_candidates(&self, snap: &Snapshot, name: &Name) -> Vec<Name> {
        let zone = &snap.config.zone;
        // The labels before `<ns>.svc.<zone>`: X.
        let keep = name.num_labels() as usize - zone.num_labels() as usize - 2;
        let Ok(mut bare) = Name::from_labels(name.iter().take(keep)) else {
            return Vec::new();
        };
        bare.set_fqdn(true);
        let mut out: Vec<Name> = [&snap.config.svc_zone, zone]
            .into_iter()
            .chain(self.host_search.iter())
            .filter_map(|suffix| bare.clone().append_domain(suffix).ok())
            .collect();
        out.push(bare);
        out
    }

    /// A search-path candidate inside the zone: its answer when the name
    /// exists (CNAMEs inside the zone followed).
    fn candidate_in_zone(snap: &Snapshot, cand: &Name, qtype: RecordType) -> Option<Answer> {
        let a = snap.lookup(cand, qtype);
        (a.rcode == ResponseCode::NoError).then(|| chase_in_zone(snap, a, qtype))
    }

    fn found(&self, name: &Name, cand: &Name, a: Answer, snap: &Snapshot) -> Answer {
        self.stats.search_path_hits.fetch_add(1, Relaxed);
        alias(name, cand, a, snap.config.ttl)
    }

    /// The search path without upstreams: the zone's candidates only.
    fn search_path_in_zone(&self, snap: &Snapshot, name: &Name, qtype: RecordType) -> Answer {
        for cand in self.search_candidates(snap, name) {
            if !zone::in_zone(&snap.config, &cand) {
                continue;
            }
            if let Some(a) = Self::candidate_in_zone(snap, &cand, qtype) {
                return self.found(name, &cand, a, snap);
            }
        }
        snap.lookup(name, qtype)
    }

    async fn search_path(&self, snap: &Snapshot, q: &Query, request: &Message) -> Answer {
        let (name, qtype) = (q.name(), q.query_type());
        for cand in self.search_candidates(snap, name) {
            if zone::in_zone(&snap.config, &cand) {
                if let Some(a) = Self::candidate_in_zone(snap, &cand, qtype) {
                    let a = self.chase(snap, a, qtype, request).await;
                    // A CNAME to a name that does not exist: walk on.
                    if a.rcode == ResponseCode::NoError {
                        return self.found(name, &cand, a, snap);
                    }
                }
                continue;
            }
            let Some(fwd) = &self.forwarder else { continue };
            let resp = fwd.forward(&sub_request(request, &cand, qtype)).await;
            match resp.metadata.response_code {
                ResponseCode::NoError => {
                    let a = Answer {
                        answers: resp.answers,
                        authorities: resp.authorities,
                        ..Answer::new(ResponseCode::NoError)
                    };
                    return self.found(name, &cand, a, snap);
                }
                // NXDOMAIN goes on; SERVFAIL etc. stop the walk: the client
                // then walks on itself.
                ResponseCode::NXDomain => continue,
                _ => break,
            }
        }
        snap.lookup(name, qtype)
    }

    /// Follow a CNAME chain (an ExternalName): inside the zone at once, then
    /// the first name outside it through the upstreams, whose answer (and
    /// rcode, RFC 6604) ends the chain.
    async fn chase(
        &self,
        snap: &Snapshot,
        a: Answer,
        qtype: RecordType,
        request: &Message,
    ) -> Answer {
        let mut a = chase_in_zone(snap, a, qtype);
        let (Some(target), Some(fwd)) = (a.chase.take(), &self.forwarder) else {
            return a;
        };
        let resp = fwd.forward(&sub_request(request, &target, qtype)).await;
        a.rcode = resp.metadata.response_code;
        a.answers.extend(resp.answers);
        if a.rcode != ResponseCode::NoError {
            a.authorities.extend(resp.authorities);
        }
        a
    }

    fn response_for(&self, request: &Message, rcode: ResponseCode) -> Message {
        let mut m = Message::new(
            request.metadata.id,
            MessageType::Response,
            request.metadata.op_code,
        );
        m.metadata.recursion_desired = request.metadata.recursion_desired;
        m.metadata.recursion_available = self.forwarder.is_some();
        m.metadata.checking_disabled = request.metadata.checking_disabled;
        m.metadata.response_code = rcode;
        m.queries = request.queries.clone();
        if let Some(req) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(MAX_UDP_PAYLOAD);
            e.set_version(0);
            e.set_dnssec_ok(req.flags().dnssec_ok);
            m.edns = Some(e);
        }
        m
    }

    fn count(&self, rcode: ResponseCode) {
        let c = match rcode {
            ResponseCode::NXDomain => &self.stats.nxdomain,
            ResponseCode::ServFail => &self.stats.servfail,
            ResponseCode::FormErr => &self.stats.formerr,
            ResponseCode::NotImp => &self.stats.notimp,
            ResponseCode::Refused => &self.stats.refused,
            _ => return,
        };
        c.fetch_add(1, Relaxed);
    }

    fn error(&self, request: &Message, rcode: ResponseCode, transport: Transport) -> Vec<u8> {
        self.count(rcode);
        let m = self.response_for(request, rcode);
        self.emit(m, request, transport)
    }

    /// An error for a request that did not parse: header only.
    fn bare_error(&self, id: u16, opcode: u8, rd: bool, rcode: ResponseCode) -> Vec<u8> {
        self.count(rcode);
        let mut m = Message::new(id, MessageType::Response, OpCode::from_u8(opcode));
        m.metadata.recursion_desired = rd;
        m.metadata.response_code = rcode;
        m.to_vec().unwrap_or_default()
    }

    fn encode(&self, request: &Message, a: Answer, transport: Transport) -> Vec<u8> {
        self.count(a.rcode);
        let mut m = self.response_for(request, a.rcode);
        m.metadata.authoritative =
            a.rcode != ResponseCode::Refused && a.rcode != ResponseCode::ServFail;
        m.answers = a.answers;
        m.authorities = a.authorities;
        m.additionals = a.additionals;
        self.emit(m, request, transport)
    }

    fn encode_forwarded(&self, request: &Message, resp: Message, transport: Transport) -> Vec<u8> {
        let rcode = resp.metadata.response_code;
        self.count(rcode);
        let mut m = self.response_for(request, rcode);
        m.metadata.authentic_data = resp.metadata.authentic_data;
        m.answers = resp.answers;
        m.authorities = resp.authorities;
        // (hickory parses the upstream's OPT into `edns`, never additionals.)
        m.additionals = resp.additionals;
        self.emit(m, request, transport)
    }

    /// Encode within the transport's size: UDP gets the client's EDNS size
    /// (512 without EDNS), at most [`MAX_UDP_PAYLOAD`]; a response that does
    /// not fit goes out with TC set and no records, and the client retries
    /// over TCP.
    fn emit(&self, m: Message, request: &Message, transport: Transport) -> Vec<u8> {
        let limit = match transport {
            Transport::Tcp => u16::MAX,
            Transport::Udp => match &request.edns {
                Some(e) => e.max_payload().clamp(512, MAX_UDP_PAYLOAD),
                None => 512,
            },
        };
        let mut buf = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_max_size(limit);
        // hickory's encoder stops at the limit and sets TC itself, leaving a
        // partial answer: a partial RRset is worse than none (RFC 2181 9).
        if m.emit(&mut enc).is_ok() && buf.len() <= limit as usize && buf[2] & 0x02 == 0 {
            return buf;
        }
        self.stats.truncated.fetch_add(1, Relaxed);
        let mut t = m;
        t.answers.clear();
        t.authorities.clear();
        t.additionals.clear();
        t.metadata.truncation = true;
        t.to_vec().unwrap_or_default()
    }
}

enum Local {
    Done(Answer),
    Upstream(Upstream),
}

/// Follow CNAMEs whose targets are in the zone (an ExternalName naming
/// another Service) right away; a target outside stays in `chase`.
fn chase_in_zone(snap: &Snapshot, mut a: Answer, qtype: RecordType) -> Answer {
    for _ in 0..MAX_CHAIN {
        let Some(target) = a.chase.clone() else { break };
        if !zone::in_zone(&snap.config, &target) {
            break;
        }
        let next = snap.lookup(&target, qtype);
        a.answers.extend(next.answers);
        a.additionals.extend(next.additionals);
        a.chase = next.chase;
        // The rcode is the chain's last name's (RFC 6604).
        if next.rcode != ResponseCode::NoError {
            a.rcode = next.rcode;
            a.authorities = next.authorities;
        }
    }
    a
}

/// The node's own search domains (resolv.conf `search`) as the tail of a
/// pod's search path: the cluster zone's own suffixes are left out (the walk
/// tries them first anyway), and names that do not parse.
pub fn host_search(search: &[String], zone: &Name) -> Vec<Name> {
    search
        .iter()
        .filter_map(|s| {
            let mut n = Name::from_ascii(s.trim_end_matches('.')).ok()?;
            n.set_fqdn(true);
            (!zone.zone_of(&n)).then_some(n)
        })
        .collect()
}

/// `name CNAME target` followed by the target's answer.
fn alias(name: &Name, target: &Name, a: Answer, ttl: u32) -> Answer {
    let mut answers = vec![Record::from_rdata(
        name.clone(),
        ttl,
        RData::CNAME(CNAME(target.clone())),
    )];
    answers.extend(a.answers);
    Answer {
        rcode: ResponseCode::NoError,
        answers,
        authorities: a.authorities,
        additionals: a.additionals,
        chase: None,
    }
}

/// The client's request with another question (same flags and DO/CD bits).
fn sub_request(request: &Message, name: &Name, qtype: RecordType) -> Message {
    let mut m = request.clone();
    m.queries = vec![Query::query(name.clone(), qtype)];
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::ForwardConfig;
    use crate::zone::tests::{backend, fixture, svc};
    use crate::zone::{compile_service, PodRecords};
    use hickory_proto::op::Message;
    use std::time::Duration;

    const POD: &str = "198.18.128.9"; // a pod of namespace shop in the fixture
    const HOST: &str = "198.18.0.11";
    const OTHER_POD: &str = "198.18.129.9"; // a pod of namespace ops

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    fn with_edns(mut m: Message, payload: u16) -> Message {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        m.edns = Some(e);
        m
    }

    fn dns(forwarder: Option<Arc<Forwarder>>) -> ClusterDns {
        ClusterDns::new(fixture(PodRecords::Disabled), forwarder, Vec::new())
    }

    async fn ask(d: &ClusterDns, m: &Message, src: &str, t: Transport) -> Message {
        let raw = m.to_vec().unwrap();
        let out = d
            .respond(&raw, src.parse().unwrap(), t)
            .await
            .expect("an answer");
        Message::from_vec(&out).unwrap()
    }

    fn rdata(m: &Message) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[tokio::test]
    async fn answers_cluster_names_authoritatively() {
        let d = dns(None);
        let r = ask(
            &d,
            &query("Web.Shop.svc.cluster.local.", RecordType::A),
            POD,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.id, 4242);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(r.metadata.recursion_desired);
        assert_eq!(
            r.queries[0].name().to_ascii(),
            "Web.Shop.svc.cluster.local."
        );
        assert_eq!(rdata(&r), ["198.19.0.20"]);
        let r = ask(
            &d,
            &query("nope.shop.svc.cluster.local.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
    }

    #[tokio::test]
    async fn malformed_and_unsupported_requests() {
        let d = dns(None);
        let src: IpAddr = HOST.parse().unwrap();
        // Too short, or a response: dropped.
        assert!(d.respond(&[1, 2, 3], src, Transport::Udp).await.is_none());
        let mut resp = query("web.shop.svc.cluster.local.", RecordType::A);
        resp.metadata.message_type = MessageType::Response;
        assert!(d
            .respond(&resp.to_vec().unwrap(), src, Transport::Udp)
            .await
            .is_none());
        // A header followed by garbage: FORMERR with the id.
        let mut raw = query("web.shop.svc.cluster.local.", RecordType::A)
            .to_vec()
            .unwrap();
        raw.truncate(20);
        let r = Message::from_vec(&d.respond(&raw, src, Transport::Udp).await.unwrap()).unwrap();
        assert_eq!(
            (r.metadata.id, r.metadata.response_code),
            (4242, ResponseCode::FormErr)
        );
        // Two questions, or none: FORMERR.
        let mut two = query("web.shop.svc.cluster.local.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("db.shop.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            ask(&d, &two, HOST, Transport::Udp)
                .await
                .metadata
                .response_code,
            ResponseCode::FormErr
        );
        let mut none = query("web.shop.svc.cluster.local.", RecordType::A);
        none.queries.clear();
        assert_eq!(
            ask(&d, &none, HOST, Transport::Udp)
                .await
                .metadata
                .response_code,
            ResponseCode::FormErr
        );
        // Opcodes other than QUERY: NOTIMP.
        for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
            let mut m = query("cluster.local.", RecordType::SOA);
            m.metadata.op_code = op;
            assert_eq!(
                ask(&d, &m, HOST, Transport::Udp)
                    .await
                    .metadata
                    .response_code,
                ResponseCode::NotImp,
                "{op:?}"
            );
        }
        // Zone transfers and other classes: REFUSED.
        for t in [RecordType::AXFR, RecordType::IXFR] {
            let r = ask(&d, &query("cluster.local.", t), HOST, Transport::Tcp).await;
            assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{t:?}");
            assert!(r.answers.is_empty());
        }
        let mut ch = query("version.bind.", RecordType::TXT);
        ch.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(
            ask(&d, &ch, HOST, Transport::Udp)
                .await
                .metadata
                .response_code,
            ResponseCode::Refused
        );
        // EDNS version 1: BADVERS.
        let mut m = with_edns(query("web.shop.svc.cluster.local.", RecordType::A), 1232);
        m.edns.as_mut().unwrap().set_version(1);
        // (BADVERS and BADSIG share the value 16; the decoder names it BADSIG.)
        let r = ask(&d, &m, HOST, Transport::Udp).await;
        assert_eq!(
            u16::from(r.metadata.response_code),
            u16::from(ResponseCode::BADVERS)
        );
        // Not a cluster name and no forwarder: REFUSED.
        let r = ask(
            &d,
            &query("example.test.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(d.stats.formerr.load(Relaxed) >= 3);
    }

    #[tokio::test]
    async fn udp_answers_fit_the_clients_size_or_set_tc() {
        let mut snap = fixture(PodRecords::Disabled);
        let zone = snap.config.zone.clone();
        let mut big = svc("shop", "big");
        big.headless = true;
        big.backends = (1..=120)
            .map(|i| backend(&format!("198.18.130.{i}"), None, true, &[]))
            .collect();
        snap.put_service(big.key(), compile_service(&zone, &big));
        let d = ClusterDns::new(snap, None, Vec::new());
        let q = query("big.shop.svc.cluster.local.", RecordType::A);
        // No EDNS: 512 bytes at most.
        let r = ask(&d, &q, HOST, Transport::Udp).await;
        assert!(r.metadata.truncation);
        assert!(r.answers.is_empty());
        assert_eq!(r.queries.len(), 1);
        // EDNS 4096 asked: capped at 1232, still too small for 120 records.
        let raw = with_edns(q.clone(), 4096).to_vec().unwrap();
        let out = d
            .respond(&raw, HOST.parse().unwrap(), Transport::Udp)
            .await
            .unwrap();
        assert!(out.len() <= MAX_UDP_PAYLOAD as usize);
        let r = Message::from_vec(&out).unwrap();
        assert!(r.metadata.truncation);
        assert_eq!(
            r.edns.as_ref().map(|e| e.max_payload()),
            Some(MAX_UDP_PAYLOAD)
        );
        // TCP: everything.
        let r = ask(&d, &q, HOST, Transport::Tcp).await;
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 120);
        // A smaller answer fits in 512 bytes without EDNS.
        let r = ask(
            &d,
            &query("db.shop.svc.cluster.local.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 2);
    }

    #[tokio::test]
    async fn search_path_is_walked_on_the_server_for_pods() {
        let mut snap = fixture(PodRecords::Disabled);
        snap.put_pod("ops", "other", &[], &[OTHER_POD.parse().unwrap()]);
        let d = ClusterDns::new(snap, None, Vec::new());
        // `web.shop` from a pod of shop: first try web.shop.shop.svc.cluster.local.
        let r = ask(
            &d,
            &query("web.shop.shop.svc.cluster.local.", RecordType::A),
            POD,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(rdata(&r), ["web.shop.svc.cluster.local.", "198.19.0.20"]);
        // The same name from a source that is no pod: NXDOMAIN (the client walks).
        let r = ask(
            &d,
            &query("web.shop.shop.svc.cluster.local.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        // A pod of another namespace asking under shop's suffix: not its
        // first step, so not walked.
        let r = ask(
            &d,
            &query("web.shop.shop.svc.cluster.local.", RecordType::A),
            OTHER_POD,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        // And a name that exists nowhere: NXDOMAIN.
        let r = ask(
            &d,
            &query("nothing.shop.svc.cluster.local.", RecordType::A),
            POD,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(
            d.stats.search_path_hits.load(Relaxed),
            1,
            "only the pod's own walk"
        );
    }

    /// An upstream on loopback: `example.test` A 198.19.255.1, NXDOMAIN otherwise.
    async fn upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::response(req.metadata.id, OpCode::Query);
                resp.metadata.recursion_available = true;
                resp.queries = req.queries.clone();
                let q = &req.queries[0];
                if q.name().to_lowercase().to_ascii() == "example.test."
                    && q.query_type() == RecordType::A
                {
                    resp.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(hickory_proto::rr::rdata::A("198.19.255.1".parse().unwrap())),
                    ));
                } else {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                }
                let _ = sock.send_to(&resp.to_vec().unwrap(), from).await;
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn forwards_chases_external_names_and_walks_to_upstream_names() {
        let (addr, task) = upstream().await;
        let fwd = Arc::new(Forwarder::new(ForwardConfig {
            upstreams: vec![addr],
            timeout: Duration::from_secs(2),
            ..Default::default()
        }));
        let d = dns(Some(fwd));
        let r = ask(
            &d,
            &query("example.test.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(rdata(&r), ["198.19.255.1"]);
        assert!(r.metadata.recursion_available);
        assert!(!r.metadata.authoritative);
        // ExternalName: the CNAME and what the upstream says about its target.
        let r = ask(
            &d,
            &query("ext.shop.svc.cluster.local.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(rdata(&r), ["example.test.", "198.19.255.1"]);
        // `example.test` from a pod (ndots:5 puts the search list first).
        let r = ask(
            &d,
            &query("example.test.shop.svc.cluster.local.", RecordType::A),
            POD,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(rdata(&r), ["example.test.", "198.19.255.1"]);
        // An upstream NXDOMAIN stays NXDOMAIN.
        let r = ask(
            &d,
            &query("missing.test.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        task.abort();
    }

    #[tokio::test]
    async fn an_external_name_inside_the_zone_is_followed_without_upstreams() {
        let mut snap = fixture(PodRecords::Disabled);
        let zone = snap.config.zone.clone();
        let mut alias = svc("shop", "alias");
        alias.external_name = Some("web.shop.svc.cluster.local".into());
        snap.put_service(alias.key(), compile_service(&zone, &alias));
        let mut dangling = svc("shop", "dangling");
        dangling.external_name = Some("gone.shop.svc.cluster.local".into());
        snap.put_service(dangling.key(), compile_service(&zone, &dangling));
        let d = ClusterDns::new(snap, None, Vec::new());
        let r = ask(
            &d,
            &query("alias.shop.svc.cluster.local.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(rdata(&r), ["web.shop.svc.cluster.local.", "198.19.0.20"]);
        let r = ask(
            &d,
            &query("dangling.shop.svc.cluster.local.", RecordType::A),
            HOST,
            Transport::Udp,
        )
        .await;
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::NXDomain,
            "the chain's last name's rcode"
        );
        assert_eq!(rdata(&r), ["gone.shop.svc.cluster.local."]);
    }

    #[test]
    fn a_request_with_no_room_upstream_gets_servfail_at_once() {
        // The forwarder is never asked: `busy` answers instead.
        let fwd = Arc::new(Forwarder::new(ForwardConfig {
            upstreams: vec!["127.0.0.1:9".parse().unwrap()],
            ..Default::default()
        }));
        let d = dns(Some(fwd.clone()));
        let raw = with_edns(query("example.test.", RecordType::A), 1232)
            .to_vec()
            .unwrap();
        let Outcome::Pending(p) = d.respond_now(&raw, HOST.parse().unwrap(), Transport::Udp) else {
            panic!("a name outside the cluster waits for the upstreams");
        };
        let r = Message::from_vec(&d.busy(p)).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(r.metadata.id, 4242);
        assert_eq!(r.queries[0].name().to_ascii(), "example.test.");
        assert!(r.edns.is_some(), "EDNS answered like any response");
        assert_eq!(d.stats.servfail.load(Relaxed), 1);
        assert_eq!(fwd.stats().queries, 0);
    }

    #[test]
    fn host_search_leaves_out_the_cluster_zone() {
        let zone = Name::from_ascii("cluster.local.").unwrap();
        let got = host_search(
            &[
                "svc.Cluster.Local".into(),
                "corp.example.test.".into(),
                "cluster.local".into(),
                "bad..name".into(),
                "lab.test".into(),
            ],
            &zone,
        );
        let got: Vec<String> = got.iter().map(|n| n.to_ascii()).collect();
        assert_eq!(got, ["corp.example.test.", "lab.test."]);
    }

    #[tokio::test]
    async fn a_published_snapshot_answers_the_next_query() {
        let d = dns(None);
        let mut snap = Snapshot::clone(&d.snapshot());
        let zone = snap.config.zone.clone();
        let mut s = svc("shop", "new");
        s.cluster_ips = vec!["198.19.0.99".parse().unwrap()];
        snap.put_service(s.key(), compile_service(&zone, &s));
        let q = query("new.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(
            ask(&d, &q, HOST, Transport::Udp)
                .await
                .metadata
                .response_code,
            ResponseCode::NXDomain
        );
        d.publish(snap);
        assert_eq!(
            rdata(&ask(&d, &q, HOST, Transport::Udp).await),
            ["198.19.0.99"]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any bytes: no panic, and whatever is sent back parses and is a
        /// response with the request's id, within the UDP size.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600), tcp in proptest::bool::ANY) {
            let d = dns(None);
            let t = if tcp { Transport::Tcp } else { Transport::Udp };
            for src in [POD, HOST] {
                if let Outcome::Reply(out) = d.respond_now(&bytes, src.parse().unwrap(), t) {
                    let m = Message::from_vec(&out).expect("replies parse");
                    proptest::prop_assert_eq!(m.metadata.message_type, MessageType::Response);
                    proptest::prop_assert_eq!(m.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]));
                    if !tcp {
                        proptest::prop_assert!(out.len() <= MAX_UDP_PAYLOAD as usize);
                    }
                }
            }
        }

        /// Valid queries with bytes flipped: the same guarantees.
        #[test]
        fn mutated_queries_never_panic(
            name in "[a-z0-9_-]{1,12}(\\.[a-z0-9_-]{1,12}){0,6}",
            qtype in proptest::sample::select(vec![RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::PTR, RecordType::TXT, RecordType::ANY, RecordType::SOA, RecordType::NS, RecordType::CNAME]),
            suffix in proptest::sample::select(vec!["", "shop.svc.cluster.local.", "svc.cluster.local.", "cluster.local.", "in-addr.arpa.", "pod.cluster.local."]),
            flips in proptest::collection::vec((proptest::num::usize::ANY, proptest::num::u8::ANY), 0..4),
            edns in proptest::bool::ANY,
        ) {
            let d = dns(None);
            let full = if suffix.is_empty() { format!("{name}.") } else { format!("{name}.{suffix}") };
            let Ok(n) = Name::from_ascii(&full) else { return Ok(()) };
            let mut m = Message::query();
            m.metadata.id = 77;
            m.add_query(Query::query(n, qtype));
            let m = if edns { with_edns(m, 1232) } else { m };
            let mut raw = m.to_vec().unwrap();
            for (at, b) in flips {
                let i = at % raw.len();
                raw[i] ^= b;
            }
            if let Outcome::Reply(out) = d.respond_now(&raw, POD.parse().unwrap(), Transport::Udp) {
                let r = Message::from_vec(&out).expect("replies parse");
                proptest::prop_assert_eq!(r.metadata.message_type, MessageType::Response);
                proptest::prop_assert!(out.len() <= MAX_UDP_PAYLOAD as usize);
            }
        }
    }
}
