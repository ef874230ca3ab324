//! Well-formed queries for names built from the zone's own labels, so that
//! nearly every input reaches the zone lookup (raw bytes mostly stop at the
//! parser). Besides the checks of [`weft_dns_fuzz::respond`]: the question is
//! echoed, a UDP reply fits the size the request allows (512 bytes without
//! EDNS), a truncated reply carries no records, and a UDP reply that was not
//! truncated says what the TCP reply says.

#![no_main]

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;
use weft_dns::handler::{Transport, MAX_UDP_PAYLOAD};
use weft_dns_fuzz::{respond, HOST, POD};

#[derive(Arbitrary, Debug)]
struct Input {
    id: u16,
    recursion_desired: bool,
    checking_disabled: bool,
    labels: Vec<Label>,
    suffix: Suffix,
    qtype: Type,
    chaos: bool,
    edns: Option<EdnsInput>,
    from_pod: bool,
}

#[derive(Arbitrary, Debug)]
enum Label {
    Known(u8),
    /// `a-b-c-d` (pod names, system-assigned endpoint hostnames).
    Dashed(Ipv4Addr),
    /// A reverse-name octet.
    Octet(u8),
    Raw(Vec<u8>),
}

/// Labels the zone has, and a few it does not.
const KNOWN: &[&str] = &[
    "web",
    "db",
    "big",
    "empty",
    "ext",
    "alias",
    "v6",
    "kube-dns",
    "shop",
    "ops",
    "kube-system",
    "svc",
    "pod",
    "db-0",
    "db-1",
    "db-2",
    "replica-7",
    "_http",
    "_sql",
    "_metrics",
    "_dns",
    "_dns-tcp",
    "_https",
    "_tcp",
    "_udp",
    "_sctp",
    "dns-version",
    "ns",
    "dns",
    "cluster",
    "local",
    "WEB",
    "Shop",
    "SVC",
    "nope",
    "*",
    "_",
];

#[derive(Arbitrary, Debug)]
enum Suffix {
    Root,
    Zone,
    Svc,
    ShopSvc,
    Pod,
    InAddr,
    Ip6,
}

#[derive(Arbitrary, Debug)]
enum Type {
    Known(u8),
    Raw(u16),
}

const TYPES: &[RecordType] = &[
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::PTR,
    RecordType::CNAME,
    RecordType::TXT,
    RecordType::SOA,
    RecordType::NS,
    RecordType::ANY,
    RecordType::AXFR,
    RecordType::IXFR,
    RecordType::MX,
];

#[derive(Arbitrary, Debug)]
struct EdnsInput {
    max_payload: u16,
    version: u8,
    dnssec_ok: bool,
}

fn name(input: &Input) -> Option<Name> {
    let mut labels: Vec<Vec<u8>> = Vec::new();
    for l in input.labels.iter().take(12) {
        labels.push(match l {
            Label::Known(i) => KNOWN[usize::from(*i) % KNOWN.len()].as_bytes().to_vec(),
            Label::Dashed(ip) => ip.to_string().replace('.', "-").into_bytes(),
            Label::Octet(o) => o.to_string().into_bytes(),
            Label::Raw(b) => b.iter().take(63).copied().collect(),
        });
    }
    let suffix = match input.suffix {
        Suffix::Root => ".",
        Suffix::Zone => "cluster.local.",
        Suffix::Svc => "svc.cluster.local.",
        Suffix::ShopSvc => "shop.svc.cluster.local.",
        Suffix::Pod => "pod.cluster.local.",
        Suffix::InAddr => "in-addr.arpa.",
        Suffix::Ip6 => "ip6.arpa.",
    };
    let suffix = Name::from_ascii(suffix).ok()?;
    if labels.is_empty() {
        return Some(suffix);
    }
    Name::from_labels(labels).ok()?.append_domain(&suffix).ok()
}

fuzz_target!(|input: Input| {
    let Some(qname) = name(&input) else {
        return;
    };
    let qtype = match input.qtype {
        Type::Known(i) => TYPES[usize::from(i) % TYPES.len()],
        Type::Raw(t) => RecordType::from(t),
    };
    let mut query = Query::query(qname, qtype);
    if input.chaos {
        query.set_query_class(DNSClass::CH);
    }
    let mut request = Message::query();
    request.metadata.id = input.id;
    request.metadata.recursion_desired = input.recursion_desired;
    request.metadata.checking_disabled = input.checking_disabled;
    request.add_query(query.clone());
    if let Some(e) = &input.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload)
            .set_version(e.version)
            .set_dnssec_ok(e.dnssec_ok);
        request.edns = Some(edns);
    }
    let Ok(raw) = request.to_vec() else {
        return;
    };
    let src = if input.from_pod { POD } else { HOST };
    // `respond` already fails on a query with a header that goes unanswered.
    let reply = |t| respond(&raw, src, t).expect("a well-formed query is always answered");
    let (udp, udp_len) = reply(Transport::Udp);
    let (tcp, _) = reply(Transport::Tcp);

    let limit = match &input.edns {
        Some(e) => e.max_payload.clamp(512, MAX_UDP_PAYLOAD),
        None => 512,
    };
    assert!(
        udp_len <= usize::from(limit),
        "a UDP reply of {udp_len} bytes, {limit} allowed"
    );
    for r in [&udp, &tcp] {
        // Parsed requests are answered with their question (name in the
        // asker's case).
        assert_eq!(r.queries.len(), 1, "the question is not echoed");
        assert_eq!(r.queries[0].name().to_ascii(), query.name().to_ascii());
        assert_eq!(r.queries[0].query_type(), query.query_type());
        if r.metadata.truncation {
            assert!(
                r.answers.is_empty() && r.authorities.is_empty(),
                "a truncated reply with records"
            );
        }
    }
    assert!(!tcp.metadata.truncation, "a truncated TCP reply");
    if !udp.metadata.truncation {
        assert_eq!(udp.metadata.response_code, tcp.metadata.response_code);
        assert_eq!(udp.answers, tcp.answers, "UDP and TCP answer differently");
        assert_eq!(udp.authorities, tcp.authorities);
    }
});
