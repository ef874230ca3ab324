//! The cluster zone as hickory-server [`ZoneHandler`]s, for use inside a
//! [`Catalog`](hickory_server::zone_handler::Catalog).
//!
//! [`ClusterZoneHandler`] answers `<zone>.` and [`ReverseZoneHandler`] the
//! PTR names of cluster addresses under `in-addr.arpa.` / `ip6.arpa.`, both
//! from the [`ClusterDns`]'s current snapshot (so they follow every
//! published update). The agent's listener does not go through here: it uses
//! [`ClusterDns`]'s direct path, which answers cluster names inline on the
//! UDP loop with no catalog lookup, task or allocation per zone handler.
//!
//! A zone [`Answer`] maps onto the catalog as: NOERROR with records →
//! `Break(Ok)` (additionals as the additional section); NXDOMAIN →
//! `Err(ResponseCode(NXDomain))` and NODATA → `Err(NameExists)`, for which
//! the catalog fetches the SOA itself with `lookup(origin, SOA)`; REFUSED →
//! `Err(ResponseCode(Refused))`, which the catalog passes through.
//!
//! What the catalog path cannot express:
//! - SERVFAIL before the first view: the catalog turns any other error of a
//!   primary zone into NOERROR, and its SOA lookup fails too, so the answer
//!   is an authoritative NOERROR with no records and no SOA (a client sees
//!   "no such record" rather than "try again"). Serve from the catalog only
//!   after the first sync.
//! - No server-side search path and no forwarding: an ExternalName answers
//!   its CNAME alone (as the direct path does without a forwarder), and a
//!   name outside every registered zone is REFUSED by the catalog. A PTR for
//!   an address the cluster does not know is `Skip`ped, so a handler chained
//!   after this one (a forwarder) can take it; with none, the catalog answers
//!   SERVFAIL (the direct path forwards it, or REFUSED without a forwarder).
//! - An SOA answer also carries the apex NS in its authority section (the
//!   catalog adds it), RA is never set, the response EDNS size is the
//!   client's (not capped at [`MAX_UDP_PAYLOAD`](crate::handler::MAX_UDP_PAYLOAD)),
//!   a message with QR set gets FORMERR instead of being dropped, and
//!   nothing is counted in [`DnsStats`](crate::DnsStats).
//!
//! The handlers implement the trait as built without hickory's DNSSEC and
//! metrics features (the crate enables neither).

use crate::handler::ClusterDns;
use crate::zone::Answer;
use async_trait::async_trait;
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RecordType, TSigResponseContext};
use hickory_server::server::{Request, RequestInfo};
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, LookupControlFlow, LookupError, LookupOptions, LookupRecords,
    ZoneHandler, ZoneTransfer, ZoneType,
};
use std::sync::Arc;

/// The cluster zone (`cluster.local.` …) as a primary zone of a catalog.
pub struct ClusterZoneHandler {
    dns: Arc<ClusterDns>,
    origin: LowerName,
}

impl ClusterZoneHandler {
    /// The zone is the current snapshot's (a zone's name does not change
    /// while it serves; later snapshots keep their config).
    pub fn new(dns: Arc<ClusterDns>) -> Self {
        let origin = LowerName::new(&dns.snapshot().config.zone);
        ClusterZoneHandler { dns, origin }
    }
}

/// PTR records of cluster addresses (Services, headless endpoints) under one
/// reverse tree; other addresses are left to the next handler in the chain.
pub struct ReverseZoneHandler {
    dns: Arc<ClusterDns>,
    origin: LowerName,
}

impl ReverseZoneHandler {
    /// `in-addr.arpa.`
    pub fn ipv4(dns: Arc<ClusterDns>) -> Self {
        Self::under(dns, "in-addr.arpa.")
    }

    /// `ip6.arpa.`
    pub fn ipv6(dns: Arc<ClusterDns>) -> Self {
        Self::under(dns, "ip6.arpa.")
    }

    fn under(dns: Arc<ClusterDns>, origin: &str) -> Self {
        let origin = Name::from_ascii(origin).expect("a constant reverse zone name");
        ReverseZoneHandler {
            dns,
            origin: LowerName::new(&origin),
        }
    }
}

/// An [`Answer`] as the catalog wants it (see the module doc).
fn flow(a: Answer) -> LookupControlFlow<AuthLookup> {
    LookupControlFlow::Break(match a.rcode {
        ResponseCode::NoError if a.answers.is_empty() => Err(LookupError::NameExists),
        ResponseCode::NoError => {
            let additionals =
                (!a.additionals.is_empty()).then_some(LookupRecords::Section(a.additionals));
            Ok(AuthLookup::answers(
                LookupRecords::Section(a.answers),
                additionals,
            ))
        }
        rcode => Err(LookupError::ResponseCode(rcode)),
    })
}

/// The question of a request as the direct path checks it: the asker's
/// spelling (answers echo its case), or REFUSED for a class other than IN
/// and for IXFR (AXFR goes to `zone_transfer`).
fn question(request: &Request) -> Result<(Name, RecordType), LookupError> {
    let info = request.request_info()?;
    let q = info.query.original();
    if q.query_class() != DNSClass::IN || q.query_type() == RecordType::IXFR {
        return Err(LookupError::ResponseCode(ResponseCode::Refused));
    }
    Ok((q.name().clone(), q.query_type()))
}

fn refused_transfer() -> Option<(
    Result<ZoneTransfer, LookupError>,
    Option<TSigResponseContext>,
)> {
    Some((Err(LookupError::ResponseCode(ResponseCode::Refused)), None))
}

#[async_trait]
impl ZoneHandler for ClusterZoneHandler {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// Also what the catalog calls for the SOA of a negative answer and the
    /// NS of an SOA answer (`name` is then the origin).
    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        flow(self.dns.snapshot().lookup(name, rtype))
    }

    async fn search(
        &self,
        request: &Request,
        _lookup_options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        let result = match question(request) {
            Ok((name, rtype)) => flow(self.dns.snapshot().lookup(&name, rtype)),
            Err(e) => LookupControlFlow::Break(Err(e)),
        };
        (result, None)
    }

    /// The zone is unsigned: no NSEC records.
    async fn nsec_records(
        &self,
        _name: &LowerName,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Break(Ok(AuthLookup::default()))
    }

    /// The zone is compiled from the view, never edited over DNS.
    async fn update(
        &self,
        _update: &Request,
        _now: u64,
    ) -> (Result<bool, ResponseCode>, Option<TSigResponseContext>) {
        (Err(ResponseCode::NotImp), None)
    }

    /// The whole cluster's names are not handed out (as the direct path).
    async fn zone_transfer(
        &self,
        _request: &Request,
        _lookup_options: LookupOptions,
        _now: u64,
    ) -> Option<(
        Result<ZoneTransfer, LookupError>,
        Option<TSigResponseContext>,
    )> {
        refused_transfer()
    }
}

#[async_trait]
impl ZoneHandler for ReverseZoneHandler {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// `Skip` for anything but a cluster address, including the catalog's
    /// SOA lookup at the origin (this handler owns no reverse zone's SOA).
    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        match self.dns.snapshot().lookup_reverse(name, rtype) {
            Some(a) => flow(a),
            None => LookupControlFlow::Skip,
        }
    }

    async fn search(
        &self,
        request: &Request,
        _lookup_options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        let result = match question(request) {
            Ok((name, rtype)) => match self.dns.snapshot().lookup_reverse(&name, rtype) {
                Some(a) => flow(a),
                None => LookupControlFlow::Skip,
            },
            // Not a question about a cluster address either.
            Err(_) => LookupControlFlow::Skip,
        };
        (result, None)
    }

    /// Unsigned, and not the owner of the reverse tree.
    async fn nsec_records(
        &self,
        _name: &LowerName,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Skip
    }

    async fn update(
        &self,
        _update: &Request,
        _now: u64,
    ) -> (Result<bool, ResponseCode>, Option<TSigResponseContext>) {
        (Err(ResponseCode::NotImp), None)
    }

    async fn zone_transfer(
        &self,
        _request: &Request,
        _lookup_options: LookupOptions,
        _now: u64,
    ) -> Option<(
        Result<ZoneTransfer, LookupError>,
        Option<TSigResponseContext>,
    )> {
        refused_transfer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{Transport, MAX_UDP_PAYLOAD};
    use crate::zone::{compile_service, PodRecords, Snapshot, ZoneConfig};
    use hickory_server::net::runtime::TokioTime;
    use hickory_server::net::xfer::Protocol;
    use hickory_server::net::NetError;
    use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_server::proto::rr::rdata::PTR;
    use hickory_server::proto::rr::{RData, Record};
    use hickory_server::proto::serialize::binary::BinEncoder;
    use hickory_server::server::{RequestHandler, ResponseHandler, ResponseInfo};
    use hickory_server::zone_handler::{Catalog, MessageResponse};
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Duration;
    use weft_model::view::{FrontendPort, Protocol as L4, ServiceEntry, ServiceType};

    /// shop/web (ClusterIP 198.19.0.20, named port http/TCP 80), shop/ext
    /// (ExternalName example.test), ops/v6 (ClusterIP fd00::a); rev 7.
    fn snapshot(synced: bool) -> Snapshot {
        let cfg = ZoneConfig::new(
            "cluster.local",
            5,
            PodRecords::Disabled,
            vec!["198.19.0.10".parse().unwrap()],
        )
        .unwrap();
        let mut snap = Snapshot::new(cfg);
        let zone = snap.config.zone.clone();
        let svc = |ns: &str, name: &str| ServiceEntry {
            namespace: ns.into(),
            name: name.into(),
            ..Default::default()
        };
        let mut web = svc("shop", "web");
        web.cluster_ips = vec!["198.19.0.20".parse().unwrap()];
        web.ports = vec![FrontendPort {
            name: "http".into(),
            protocol: L4::TCP,
            port: 80,
            node_port: None,
        }];
        let mut ext = svc("shop", "ext");
        ext.service_type = ServiceType::ExternalName;
        ext.external_name = Some("example.test".into());
        let mut v6 = svc("ops", "v6");
        v6.cluster_ips = vec!["fd00::a".parse().unwrap()];
        for s in [web, ext, v6] {
            let r = compile_service(&zone, &s);
            snap.put_service(s.key(), r);
        }
        snap.synced = synced;
        snap.rev = 7;
        snap
    }

    fn dns(synced: bool) -> Arc<ClusterDns> {
        Arc::new(ClusterDns::new(snapshot(synced), None, Vec::new()))
    }

    fn catalog(dns: &Arc<ClusterDns>) -> Catalog {
        let mut c = Catalog::new();
        let zone = ClusterZoneHandler::new(dns.clone());
        c.upsert(zone.origin().clone(), vec![Arc::new(zone)]);
        for rev in [
            ReverseZoneHandler::ipv4(dns.clone()),
            ReverseZoneHandler::ipv6(dns.clone()),
        ] {
            c.upsert(rev.origin().clone(), vec![Arc::new(rev)]);
        }
        c
    }

    /// Keeps the encoded response.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

    #[async_trait]
    impl ResponseHandler for Capture {
        async fn send_response<'a>(
            &mut self,
            response: MessageResponse<
                '_,
                'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
            >,
        ) -> Result<ResponseInfo, NetError> {
            let mut buf = Vec::new();
            let info = response.destructive_emit(&mut BinEncoder::new(&mut buf))?;
            *self.0.lock().unwrap() = Some(buf);
            Ok(info)
        }
    }

    const SRC: &str = "10.0.0.1:5353";

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    async fn handle(catalog: &Catalog, m: &Message) -> Message {
        let src: SocketAddr = SRC.parse().unwrap();
        let request = Request::from_bytes(m.to_vec().unwrap(), src, Protocol::Udp).unwrap();
        let capture = Capture::default();
        catalog
            .handle_request::<_, TokioTime>(&request, capture.clone())
            .await;
        let raw = capture.0.lock().unwrap().take().expect("a response");
        Message::from_vec(&raw).unwrap()
    }

    async fn ask(catalog: &Catalog, name: &str, qtype: RecordType) -> Message {
        handle(catalog, &query(name, qtype)).await
    }

    fn data(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.data.to_string()).collect()
    }

    fn types(records: &[Record]) -> Vec<RecordType> {
        records.iter().map(Record::record_type).collect()
    }

    #[tokio::test]
    async fn a_for_a_cluster_ip_service() {
        let c = catalog(&dns(true));
        let r = ask(&c, "WEB.shop.svc.Cluster.Local.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(data(&r.answers), ["198.19.0.20"]);
        assert_eq!(r.answers[0].ttl, 5);
        // The asker's spelling is echoed, as on the direct path.
        assert_eq!(r.answers[0].name.to_ascii(), "WEB.shop.svc.Cluster.Local.");
        assert!(r.authorities.is_empty());
    }

    #[tokio::test]
    async fn srv_with_the_target_address_as_additional() {
        let c = catalog(&dns(true));
        let r = ask(
            &c,
            "_http._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(data(&r.answers), ["0 100 80 web.shop.svc.cluster.local."]);
        assert_eq!(data(&r.additionals), ["198.19.0.20"]);
    }

    #[tokio::test]
    async fn nxdomain_carries_the_soa() {
        let c = catalog(&dns(true));
        let r = ask(&c, "nope.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        assert_eq!(types(&r.authorities), [RecordType::SOA]);
        assert_eq!(r.authorities[0].name.to_ascii(), "cluster.local.");
        assert!(data(&r.authorities)[0].contains(" 7 "), "serial = revision");
    }

    #[tokio::test]
    async fn nodata_is_noerror_with_the_soa() {
        let c = catalog(&dns(true));
        let r = ask(&c, "web.shop.svc.cluster.local.", RecordType::AAAA).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(types(&r.authorities), [RecordType::SOA]);
    }

    #[tokio::test]
    async fn apex_soa_and_ns() {
        let c = catalog(&dns(true));
        let r = ask(&c, "cluster.local.", RecordType::SOA).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(types(&r.answers), [RecordType::SOA]);
        // The catalog adds the apex NS to an SOA answer (the direct path
        // does not).
        assert_eq!(data(&r.authorities), ["ns.dns.cluster.local."]);
        let r = ask(&c, "cluster.local.", RecordType::NS).await;
        assert_eq!(data(&r.answers), ["ns.dns.cluster.local."]);
        assert_eq!(data(&r.additionals), ["198.19.0.10"]);
    }

    #[tokio::test]
    async fn ptr_for_cluster_addresses() {
        let c = catalog(&dns(true));
        let r = ask(&c, "20.0.19.198.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(data(&r.answers), ["web.shop.svc.cluster.local."]);
        let v6 = "a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        let r = ask(&c, v6, RecordType::PTR).await;
        assert_eq!(data(&r.answers), ["v6.ops.svc.cluster.local."]);
        // Not a cluster address, nothing chained after: SERVFAIL.
        let r = ask(&c, "8.8.8.8.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    }

    /// Answers every question with one PTR, like a forwarder would.
    struct Upstream(LowerName);

    #[async_trait]
    impl ZoneHandler for Upstream {
        fn zone_type(&self) -> ZoneType {
            ZoneType::External
        }
        fn axfr_policy(&self) -> AxfrPolicy {
            AxfrPolicy::Deny
        }
        fn origin(&self) -> &LowerName {
            &self.0
        }
        async fn lookup(
            &self,
            name: &LowerName,
            _rtype: RecordType,
            _request_info: Option<&RequestInfo<'_>>,
            _lookup_options: LookupOptions,
        ) -> LookupControlFlow<AuthLookup> {
            let target = Name::from_ascii("dns.google.").unwrap();
            let ptr = Record::from_rdata(Name::from(name.clone()), 60, RData::PTR(PTR(target)));
            LookupControlFlow::Break(Ok(LookupRecords::Section(vec![ptr]).into()))
        }
        async fn search(
            &self,
            request: &Request,
            lookup_options: LookupOptions,
        ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
            let info = request.request_info().unwrap();
            let r = self
                .lookup(
                    info.query.name(),
                    info.query.query_type(),
                    None,
                    lookup_options,
                )
                .await;
            (r, None)
        }
        async fn nsec_records(
            &self,
            _name: &LowerName,
            _lookup_options: LookupOptions,
        ) -> LookupControlFlow<AuthLookup> {
            LookupControlFlow::Skip
        }
    }

    #[tokio::test]
    async fn other_addresses_go_to_the_next_handler() {
        let dns = dns(true);
        let mut c = Catalog::new();
        let rev = ReverseZoneHandler::ipv4(dns.clone());
        let origin = rev.origin().clone();
        c.upsert(
            origin.clone(),
            vec![Arc::new(rev), Arc::new(Upstream(origin))],
        );
        let r = ask(&c, "8.8.8.8.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(data(&r.answers), ["dns.google."]);
        // A cluster address never reaches it.
        let r = ask(&c, "20.0.19.198.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(data(&r.answers), ["web.shop.svc.cluster.local."]);
    }

    #[tokio::test]
    async fn before_the_first_view_servfail_becomes_an_empty_noerror() {
        // The zone says SERVFAIL; the catalog makes it an authoritative
        // NOERROR without records or SOA (see the module doc).
        let c = catalog(&dns(false));
        let r = ask(&c, "web.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty() && r.authorities.is_empty());
        let r = ask(&c, "20.0.19.198.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
    }

    #[tokio::test]
    async fn refusals_and_the_cname_alone() {
        let c = catalog(&dns(true));
        let r = ask(&c, "cluster.local.", RecordType::AXFR).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(r.answers.is_empty());
        let r = ask(&c, "cluster.local.", RecordType::IXFR).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        let mut chaos = query("web.shop.svc.cluster.local.", RecordType::A);
        chaos.queries[0].set_query_class(DNSClass::CH);
        let r = handle(&c, &chaos).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        // No handler for the name: REFUSED (the direct path forwards it).
        let r = ask(&c, "example.com.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        // An ExternalName: its CNAME, not chased.
        let r = ask(&c, "ext.shop.svc.cluster.local.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(types(&r.answers), [RecordType::CNAME]);
        assert_eq!(data(&r.answers), ["example.test."]);
    }

    /// The catalog and the direct path (no forwarder) agree on the
    /// sections of in-zone answers, except the documented differences.
    #[tokio::test]
    async fn catalog_agrees_with_the_direct_path() {
        let dns = dns(true);
        let c = catalog(&dns);
        let src: SocketAddr = SRC.parse().unwrap();
        for (name, qtype) in [
            ("web.shop.svc.cluster.local.", RecordType::A),
            ("web.shop.svc.cluster.local.", RecordType::AAAA),
            ("_http._tcp.web.shop.svc.cluster.local.", RecordType::SRV),
            ("nope.shop.svc.cluster.local.", RecordType::A),
            ("shop.svc.cluster.local.", RecordType::A),
            ("dns-version.cluster.local.", RecordType::TXT),
            ("ns.dns.cluster.local.", RecordType::A),
            ("cluster.local.", RecordType::NS),
            ("ext.shop.svc.cluster.local.", RecordType::A),
            ("20.0.19.198.in-addr.arpa.", RecordType::PTR),
            ("20.0.19.198.in-addr.arpa.", RecordType::TXT),
        ] {
            let q = query(name, qtype);
            let raw = dns
                .respond(&q.to_vec().unwrap(), src.ip(), Transport::Udp)
                .await
                .unwrap();
            let direct = Message::from_vec(&raw).unwrap();
            let via = handle(&c, &q).await;
            let what = format!("{name} {qtype}");
            assert_eq!(
                via.metadata.response_code, direct.metadata.response_code,
                "{what}"
            );
            assert_eq!(
                via.metadata.authoritative, direct.metadata.authoritative,
                "{what}"
            );
            assert_eq!(via.answers, direct.answers, "{what}");
            assert_eq!(via.authorities, direct.authorities, "{what}");
            assert_eq!(via.additionals, direct.additionals, "{what}");
        }
    }

    /// Header-level differences of the catalog path (module doc).
    #[tokio::test]
    async fn catalog_header_differences() {
        let dns = dns(true);
        let c = catalog(&dns);
        let src: SocketAddr = SRC.parse().unwrap();
        let mut q = query("web.shop.svc.cluster.local.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.edns = Some(edns);
        let via = handle(&c, &q).await;
        assert!(!via.metadata.recursion_available);
        assert_eq!(via.edns.as_ref().map(Edns::max_payload), Some(4096));
        let raw = dns
            .respond(&q.to_vec().unwrap(), src.ip(), Transport::Udp)
            .await
            .unwrap();
        let direct = Message::from_vec(&raw).unwrap();
        assert_eq!(
            direct.edns.as_ref().map(Edns::max_payload),
            Some(MAX_UDP_PAYLOAD)
        );
        // A message with QR set: FORMERR here, dropped by the direct path.
        let mut reflected = query("web.shop.svc.cluster.local.", RecordType::A);
        reflected.metadata.message_type = MessageType::Response;
        let r = handle(&c, &reflected).await;
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let raw = reflected.to_vec().unwrap();
        assert!(dns.respond(&raw, src.ip(), Transport::Udp).await.is_none());
        // Only the two direct requests were counted.
        assert_eq!(
            dns.stats.queries.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    /// One round trip through hickory's `Server` on a real socket.
    #[tokio::test]
    async fn served_by_a_hickory_server_over_udp() {
        let c = catalog(&dns(true));
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut server = hickory_server::Server::new(c);
        server.register_socket(socket);
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let q = query("web.shop.svc.cluster.local.", RecordType::A);
        client.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
        let mut buf = [0u8; 1232];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert_eq!(from, addr);
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(data(&r.answers), ["198.19.0.20"]);
        server.shutdown_gracefully().await.unwrap();
    }
}
