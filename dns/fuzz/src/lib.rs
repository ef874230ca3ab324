//! What the weft-dns fuzz targets share: the handler under test with its
//! zone, the sources queries come from, and the checks every reply passes.
//!
//! The zone is this crate's own: weft-dns's test fixture (`zone::tests`) is
//! `cfg(test)`, and the targets want more than it has (a reply too big for
//! UDP, an ExternalName into the zone, kube-dns, dual-stack and shared pod
//! addresses).

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::Name;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use weft_dns::handler::{Outcome, Transport, MAX_UDP_PAYLOAD};
use weft_dns::zone::compile_service;
use weft_dns::{ClusterDns, PodRecords, Snapshot, ZoneConfig};
use weft_model::view::{Backend, BackendPort, FrontendPort, Protocol, ServiceEntry, ServiceType};

/// A pod of namespace `shop`: its `X.shop.svc.cluster.local` misses walk the
/// search path on the server.
pub const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 9));
/// A node address: no pod, so no server-side search path.
pub const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11));

/// Ask the handler under test `request` from `src` over `transport`: its
/// reply, parsed, and the reply's length, after the checks of `check`.
/// `None`: dropped.
pub fn respond(request: &[u8], src: IpAddr, transport: Transport) -> Option<(Message, usize)> {
    check(
        request,
        transport,
        cluster_dns().respond_now(request, src, transport),
    )
}

/// The checks that hold for any input: only a response or less than a header
/// goes unanswered, nothing is left pending (there is no forwarder), and a
/// reply parses, is a response, carries the request's id and fits
/// [`MAX_UDP_PAYLOAD`] over UDP.
fn check(request: &[u8], transport: Transport, outcome: Outcome) -> Option<(Message, usize)> {
    let reply = match outcome {
        Outcome::Reply(reply) => reply,
        Outcome::Drop => {
            assert!(
                request.len() < 12 || request[2] & 0x80 != 0,
                "a request with a header and QR clear was dropped"
            );
            return None;
        }
        Outcome::Pending(_) => panic!("no forwarder, yet the request is pending"),
    };
    let msg = match Message::from_vec(&reply) {
        Ok(m) => m,
        Err(e) => panic!("the reply does not parse: {e}; reply {reply:02x?}"),
    };
    assert_eq!(
        msg.metadata.message_type,
        MessageType::Response,
        "the reply is not a response"
    );
    if let [hi, lo, ..] = request {
        assert_eq!(
            msg.metadata.id,
            u16::from_be_bytes([*hi, *lo]),
            "the reply's id is not the request's"
        );
    }
    if transport == Transport::Udp {
        assert!(
            reply.len() <= usize::from(MAX_UDP_PAYLOAD),
            "a UDP reply of {} bytes",
            reply.len()
        );
    }
    Some((msg, reply.len()))
}

/// The handler every target asks, built once per process.
fn cluster_dns() -> &'static ClusterDns {
    static DNS: OnceLock<ClusterDns> = OnceLock::new();
    DNS.get_or_init(|| {
        let host_search = vec![Name::from_ascii("corp.example.").expect("a literal name")];
        ClusterDns::new(snapshot(), None, host_search)
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a literal address")
}

fn port(name: &str, protocol: Protocol, port: u16) -> FrontendPort {
    FrontendPort {
        name: name.into(),
        protocol,
        port,
        node_port: None,
    }
}

fn backend(addr: &str, hostname: Option<&str>, ready: bool, ports: &[(&str, u16)]) -> Backend {
    Backend {
        ip: ip(addr),
        node: Some("node-1".into()),
        hostname: hostname.map(str::to_string),
        target: None,
        zone: None,
        ports: ports
            .iter()
            .map(|(name, port)| BackendPort {
                name: (*name).into(),
                protocol: Protocol::TCP,
                port: *port,
            })
            .collect(),
        ready,
        serving: ready,
        terminating: false,
    }
}

fn service(ns: &str, name: &str) -> ServiceEntry {
    ServiceEntry {
        namespace: ns.into(),
        name: name.into(),
        ..Default::default()
    }
}

/// `cluster.local` with verified pod records and:
/// - shop/web: dual-stack ClusterIP, named ports http/TCP and dns/UDP, an
///   unnamed port;
/// - shop/db: headless, endpoints with and without hostnames, one not ready,
///   named ports one endpoint lacks;
/// - shop/big: headless with enough endpoints to overflow a UDP reply;
/// - shop/empty: headless, no ready endpoint; shop/ext: ExternalName out of
///   the zone; shop/alias: ExternalName into the zone;
/// - ops/v6: IPv6-only ClusterIP; kube-system/kube-dns;
/// - pods: shop/client (the [`POD`] source), a dual-stack pod, and an
///   address two pods share (no single namespace).
fn snapshot() -> Snapshot {
    let config = ZoneConfig::new(
        "cluster.local",
        5,
        PodRecords::Verified,
        vec![ip("10.96.0.10")],
    )
    .expect("a valid zone");
    let mut snap = Snapshot::new(config);
    let zone = snap.config.zone.clone();

    let mut web = service("shop", "web");
    web.cluster_ips = vec![ip("10.96.0.20"), ip("fd00:96::20")];
    web.ports = vec![
        port("http", Protocol::TCP, 80),
        port("dns", Protocol::UDP, 53),
        port("", Protocol::TCP, 8080),
    ];

    let mut db = service("shop", "db");
    db.headless = true;
    db.ports = vec![
        port("sql", Protocol::TCP, 5432),
        port("metrics", Protocol::TCP, 9187),
    ];
    db.backends = vec![
        backend(
            "10.244.1.5",
            Some("db-0"),
            true,
            &[("sql", 15432), ("metrics", 9187)],
        ),
        backend("10.244.2.6", Some("db-1"), true, &[("sql", 15432)]),
        backend("10.244.2.7", None, true, &[("sql", 15432)]),
        backend("10.244.2.8", Some("db-2"), false, &[("sql", 15432)]),
        backend("fd00:244::6", Some("db-1"), true, &[("sql", 15432)]),
    ];

    let mut big = service("shop", "big");
    big.headless = true;
    big.ports = vec![port("http", Protocol::TCP, 80)];
    big.backends = (1..=80)
        .map(|i| {
            let host = format!("replica-{i}");
            backend(
                &format!("10.244.3.{i}"),
                Some(&host),
                true,
                &[("http", 8080)],
            )
        })
        .collect();

    let mut empty = service("shop", "empty");
    empty.headless = true;
    empty.backends = vec![backend("10.244.2.9", None, false, &[])];

    let mut ext = service("shop", "ext");
    ext.service_type = ServiceType::ExternalName;
    ext.external_name = Some("Example.Test".into());

    let mut alias = service("shop", "alias");
    alias.service_type = ServiceType::ExternalName;
    alias.external_name = Some("web.shop.svc.cluster.local.".into());

    let mut v6 = service("ops", "v6");
    v6.cluster_ips = vec![ip("fd00:96::a")];
    v6.ports = vec![port("https", Protocol::TCP, 443)];

    let mut kube_dns = service("kube-system", "kube-dns");
    kube_dns.cluster_ips = vec![ip("10.96.0.10")];
    kube_dns.ports = vec![
        port("dns", Protocol::UDP, 53),
        port("dns-tcp", Protocol::TCP, 53),
    ];

    for s in [web, db, big, empty, ext, alias, v6, kube_dns] {
        let records = compile_service(&zone, &s);
        assert!(
            records.is_some(),
            "fixture service {}/{}",
            s.namespace,
            s.name
        );
        snap.put_service(s.key(), records);
    }
    snap.put_pod("shop", "client", &[], &[POD]);
    snap.put_pod("ops", "dual", &[], &[ip("10.244.2.20"), ip("fd00:244::20")]);
    snap.put_pod("shop", "a", &[], &[ip("10.244.2.30")]);
    snap.put_pod("ops", "b", &[], &[ip("10.244.2.30")]);
    snap.synced = true;
    snap.rev = 42;
    snap
}
