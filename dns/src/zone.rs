//! The cluster zone (Kubernetes DNS specification, schema 1.1.0) over the
//! node view: what is compiled from each Service and Pod, and the pure
//! lookup that answers one question from a snapshot.
//!
//! Names are looked up structurally, not through a table of every name: a
//! question below the zone is split into labels and dispatched on their
//! shape (`<svc>.<ns>.svc`, `<host>.<svc>.<ns>.svc`, `_<port>._<proto>.<svc>.<ns>.svc`,
//! `<a-b-c-d>.<ns>.pod`, `dns-version`, the apex). A Service's records are
//! compiled once per change into [`ServiceRecords`]; an update replaces one
//! entry of one shard, so a change costs O(change), not O(cluster).

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use weft_model::view::{Protocol, ServiceEntry};

/// The schema version of the Kubernetes DNS specification served.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// Whether and how `a-b-c-d.<ns>.pod.<zone>` names are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PodRecords {
    /// No pod records (NXDOMAIN): the default.
    #[default]
    Disabled,
    /// Any well-formed `a-b-c-d.<ns>.pod` name answers its address (kube-dns's
    /// historical behaviour; anyone can mint a name for any address).
    Insecure,
    /// Only addresses of pods that exist in that namespace.
    Verified,
}

/// Zone settings.
#[derive(Clone, Debug)]
pub struct ZoneConfig {
    /// The cluster domain, e.g. `cluster.local`.
    pub zone: Name,
    /// TTL of every record (the specification's `<ttl>`; 5 s by default).
    pub ttl: u32,
    pub pods: PodRecords,
    /// Addresses of the server itself: `ns.dns.<zone>` answers them.
    pub nameservers: Vec<IpAddr>,
    /// `ns.dns.<zone>`: the NS of the apex and the SOA's MNAME.
    pub ns_name: Name,
    /// `hostmaster.<zone>`: the SOA's RNAME.
    pub hostmaster: Name,
    /// `svc.<zone>`: the second step of a pod's search path.
    pub svc_zone: Name,
}

/// A zone setting that is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ZoneConfigError {
    #[error("zone {value:?} is not a valid domain name: {reason}")]
    Zone { value: String, reason: String },
    #[error("ttl {value} is out of range (1..=86400)")]
    Ttl { value: u32 },
}

impl ZoneConfig {
    pub fn new(
        zone: &str,
        ttl: u32,
        pods: PodRecords,
        nameservers: Vec<IpAddr>,
    ) -> Result<ZoneConfig, ZoneConfigError> {
        let bad = |reason: String| ZoneConfigError::Zone {
            value: zone.to_string(),
            reason,
        };
        let trimmed = zone.trim_end_matches('.');
        if trimmed.is_empty() {
            return Err(bad("empty".into()));
        }
        let mut name = Name::from_ascii(trimmed).map_err(|e| bad(e.to_string()))?;
        name.set_fqdn(true);
        if !(1..=86_400).contains(&ttl) {
            return Err(ZoneConfigError::Ttl { value: ttl });
        }
        let zone = name.to_lowercase();
        let under = |labels: &[&str]| {
            let mut n = zone.clone();
            for l in labels {
                n = n.prepend_label(*l).map_err(|e| bad(e.to_string()))?;
            }
            Ok::<Name, ZoneConfigError>(n)
        };
        Ok(ZoneConfig {
            ns_name: under(&["dns", "ns"])?,
            hostmaster: under(&["hostmaster"])?,
            svc_zone: under(&["svc"])?,
            zone,
            ttl,
            pods,
            nameservers,
        })
    }
}

/// One Service compiled for DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecords {
    /// `<svc>.<ns>.svc.<zone>.`, lower case.
    pub name: Name,
    pub kind: ServiceKind,
    /// Named ports: `_<name>._<proto>` (lower case) and, for a cluster IP
    /// Service, its port number (headless: each endpoint's own port).
    pub ports: Vec<NamedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    ClusterIp {
        ips: Vec<IpAddr>,
    },
    /// Ready endpoints (all of them with publishNotReadyAddresses).
    Headless {
        endpoints: Vec<Endpoint>,
    },
    ExternalName(Name),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's hostname, or a system-assigned one (its address with
    /// dashes), lower case.
    pub hostname: String,
    pub ip: IpAddr,
    /// The endpoint's port for each of the Service's named ports (same order
    /// as [`ServiceRecords::ports`]; `None` where the endpoint lacks it).
    pub ports: Vec<Option<u16>>,
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::TCP => "_tcp",
        Protocol::UDP => "_udp",
        Protocol::SCTP => "_sctp",
    }
}

/// The system-assigned hostname of an endpoint without one: its address with
/// dashes (`198-18-128-5`, `fd00--5`), as CoreDNS names them.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// `<svc>.<ns>.svc.<zone>.`
fn service_name(zone: &Name, ns: &str, svc: &str) -> Option<Name> {
    Name::from_labels([svc.as_bytes(), ns.as_bytes(), b"svc"])
        .ok()?
        .append_domain(zone)
        .ok()
        .map(|n| n.to_lowercase())
}

/// Compile one Service. `None` when its names are not valid DNS names (the
/// API validates them; a view from elsewhere may not).
pub fn compile_service(zone: &Name, s: &ServiceEntry) -> Option<ServiceRecords> {
    let ns = s.namespace.to_ascii_lowercase();
    let svc = s.name.to_ascii_lowercase();
    let name = service_name(zone, &ns, &svc)?;
    let ports: Vec<NamedPort> = s
        .ports
        .iter()
        .filter(|p| !p.name.is_empty())
        .map(|p| NamedPort {
            name: p.name.to_ascii_lowercase(),
            protocol: p.protocol,
            port: p.port,
        })
        .collect();
    let kind = if let Some(ext) = &s.external_name {
        let mut target = Name::from_ascii(ext.trim_end_matches('.')).ok()?;
        target.set_fqdn(true);
        ServiceKind::ExternalName(target.to_lowercase())
    } else if s.headless || s.cluster_ips.is_empty() {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for b in &s.backends {
            if !(b.ready || s.publish_not_ready) {
                continue;
            }
            // One record per address even if several slices list it.
            if endpoints.iter().any(|e| e.ip == b.ip) {
                continue;
            }
            let hostname = match &b.hostname {
                Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
                _ => dashed(b.ip),
            };
            endpoints.push(Endpoint {
                hostname,
                ip: b.ip,
                ports: ports
                    .iter()
                    .map(|p| {
                        b.ports
                            .iter()
                            .find(|bp| {
                                bp.name.eq_ignore_ascii_case(&p.name) && bp.protocol == p.protocol
                            })
                            .map(|bp| bp.port)
                    })
                    .collect(),
            });
        }
        ServiceKind::Headless { endpoints }
    } else {
        ServiceKind::ClusterIp {
            ips: s.cluster_ips.clone(),
        }
    };
    Some(ServiceRecords { name, kind, ports })
}

impl ServiceRecords {
    /// Addresses whose PTR names this Service (cluster IPs; headless
    /// endpoints), with the name each points to.
    pub fn reverse(&self) -> Vec<(IpAddr, Name)> {
        match &self.kind {
            ServiceKind::ClusterIp { ips } => {
                ips.iter().map(|ip| (*ip, self.name.clone())).collect()
            }
            ServiceKind::Headless { endpoints } => endpoints
                .iter()
                .filter_map(|e| {
                    let n = self.name.prepend_label(e.hostname.as_bytes()).ok()?;
                    Some((e.ip, n))
                })
                .collect(),
            ServiceKind::ExternalName(_) => Vec::new(),
        }
    }
}

/// A map split into shards, each behind its own `Arc`: a snapshot is cloned
/// in O(shards), and an update copies only the shard it touches.
#[derive(Clone, Debug)]
pub struct Sharded<K, V> {
    shards: Vec<Arc<HashMap<K, V>>>,
    hasher: std::collections::hash_map::RandomState,
}

const SHARDS: usize = 64;

impl<K: Hash + Eq + Clone, V: Clone> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Sharded<K, V> {
    fn shard(&self, k: &K) -> usize {
        (self.hasher.hash_one(k) as usize) % SHARDS
    }
    pub fn get(&self, k: &K) -> Option<&V> {
        self.shards[self.shard(k)].get(k)
    }
    pub fn get_mut_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        let i = self.shard(&k);
        Arc::make_mut(&mut self.shards[i]).entry(k).or_default()
    }
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let i = self.shard(&k);
        Arc::make_mut(&mut self.shards[i]).insert(k, v)
    }
    pub fn remove(&mut self, k: &K) -> Option<V> {
        let i = self.shard(k);
        if !self.shards[i].contains_key(k) {
            return None;
        }
        Arc::make_mut(&mut self.shards[i]).remove(k)
    }
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }
}

/// What the zone answers from: immutable once published (the server swaps
/// whole snapshots; a query never waits for an update).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub config: Arc<ZoneConfig>,
    /// False until the first view arrived: cluster names get SERVFAIL.
    pub synced: bool,
    pub rev: u64,
    pub services: Sharded<(String, String), Arc<ServiceRecords>>,
    /// Services per namespace: `<ns>.svc.<zone>` exists while it has one.
    pub namespaces: Arc<HashMap<String, usize>>,
    /// PTR targets per address (Services and headless endpoints).
    pub reverse: Sharded<IpAddr, Vec<Name>>,
    /// Pods per address. Answers `verified` pod records and says which
    /// namespace a query's source belongs to.
    pub pods: Sharded<IpAddr, PodOwners>,
    /// Namespace names shared by the pod entries (one allocation per
    /// namespace, not per pod).
    interned: Arc<HashMap<Box<str>, Arc<str>>>,
}

/// A pod that owns an address: its namespace, and its name as a hash (only
/// needed to tell two owners apart while one replaces the other).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodOwner {
    pub namespace: Arc<str>,
    name_hash: u64,
}

/// The owners of one address: almost always one, kept inline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PodOwners {
    #[default]
    None,
    One(PodOwner),
    Many(Vec<PodOwner>),
}

impl PodOwners {
    pub fn iter(&self) -> impl Iterator<Item = &PodOwner> {
        let (one, many): (Option<&PodOwner>, &[PodOwner]) = match self {
            PodOwners::None => (None, &[]),
            PodOwners::One(o) => (Some(o), &[]),
            PodOwners::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter())
    }

    fn add(&mut self, o: PodOwner) {
        if self.iter().any(|x| *x == o) {
            return;
        }
        *self = match std::mem::take(self) {
            PodOwners::None => PodOwners::One(o),
            PodOwners::One(a) => PodOwners::Many(vec![a, o]),
            PodOwners::Many(mut v) => {
                v.push(o);
                PodOwners::Many(v)
            }
        };
    }

    fn remove(&mut self, o: &PodOwner) {
        *self = match std::mem::take(self) {
            PodOwners::One(a) if a == *o => PodOwners::None,
            PodOwners::Many(mut v) => {
                v.retain(|x| x != o);
                match v.len() {
                    0 => PodOwners::None,
                    1 => PodOwners::One(v.remove(0)),
                    _ => PodOwners::Many(v),
                }
            }
            other => other,
        };
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, PodOwners::None)
    }
}

fn name_hash(name: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(name.as_bytes());
    h.finish()
}

impl Snapshot {
    pub fn new(config: ZoneConfig) -> Snapshot {
        Snapshot {
            config: Arc::new(config),
            synced: false,
            rev: 0,
            services: Sharded::default(),
            namespaces: Arc::new(HashMap::new()),
            reverse: Sharded::default(),
            pods: Sharded::default(),
            interned: Arc::new(HashMap::new()),
        }
    }

    /// Replace (or with `None` remove) one Service's records.
    pub fn put_service(&mut self, key: (String, String), records: Option<ServiceRecords>) {
        let records = records.map(Arc::new);
        let old = match &records {
            Some(r) => self.services.insert(key.clone(), r.clone()),
            None => self.services.remove(&key),
        };
        if let Some(old) = &old {
            for (ip, name) in old.reverse() {
                let list = self.reverse.get_mut_or_default(ip);
                list.retain(|n| n != &name);
                if list.is_empty() {
                    self.reverse.remove(&ip);
                }
            }
        }
        if let Some(new) = &records {
            for (ip, name) in new.reverse() {
                let list = self.reverse.get_mut_or_default(ip);
                if !list.contains(&name) {
                    list.push(name);
                }
            }
        }
        let ns = key.0.to_ascii_lowercase();
        match (old.is_some(), records.is_some()) {
            (false, true) => *Arc::make_mut(&mut self.namespaces).entry(ns).or_default() += 1,
            (true, false) => {
                let m = Arc::make_mut(&mut self.namespaces);
                if let Some(n) = m.get_mut(&ns) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&ns);
                    }
                }
            }
            _ => {}
        }
    }

    /// A pod's addresses changed from `old` to `new` (empty: absent).
    pub fn put_pod(&mut self, namespace: &str, name: &str, old: &[IpAddr], new: &[IpAddr]) {
        let ns: Arc<str> = match self.interned.get(namespace) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = Arc::from(namespace);
                Arc::make_mut(&mut self.interned).insert(namespace.into(), a.clone());
                a
            }
        };
        let owner = PodOwner {
            namespace: ns,
            name_hash: name_hash(name),
        };
        for ip in old {
            if new.contains(ip) {
                continue;
            }
            let owners = self.pods.get_mut_or_default(*ip);
            owners.remove(&owner);
            if owners.is_empty() {
                self.pods.remove(ip);
            }
        }
        for ip in new {
            self.pods.get_mut_or_default(*ip).add(owner.clone());
        }
    }

    /// The namespace of the pod that owns `ip`, when exactly one does.
    pub fn pod_namespace(&self, ip: IpAddr) -> Option<&str> {
        match self.pods.get(&ip)? {
            PodOwners::One(o) => Some(&o.namespace),
            _ => None,
        }
    }
}

/// The answer to one question from the zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    /// An ExternalName (or a chain ending outside the zone): the caller
    /// resolves this name for the question's type and appends it.
    pub chase: Option<Name>,
}

impl Answer {
    pub fn new(rcode: ResponseCode) -> Answer {
        Answer {
            rcode,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            chase: None,
        }
    }
}

/// Whether `name` is inside the cluster zone (then the zone answers it).
pub fn in_zone(config: &ZoneConfig, name: &Name) -> bool {
    config.zone.zone_of(name)
}

/// A reverse name (`*.in-addr.arpa.` / `*.ip6.arpa.`) of a full address.
pub fn reverse_ip(name: &Name) -> Option<IpAddr> {
    let net = name.parse_arpa_name().ok()?;
    let full = match net.addr() {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    (net.prefix_len() == full).then_some(net.addr())
}

impl Snapshot {
    fn soa(&self) -> Record {
        let c = &self.config;
        // The serial follows the view's revision (wrapping, RFC 1982).
        let soa = SOA::new(
            c.ns_name.clone(),
            c.hostmaster.clone(),
            self.rev as u32,
            7200,
            1800,
            86400,
            c.ttl,
        );
        Record::from_rdata(c.zone.clone(), c.ttl, RData::SOA(soa))
    }

    fn nxdomain(&self) -> Answer {
        let mut a = Answer::new(ResponseCode::NXDomain);
        a.authorities.push(self.soa());
        a
    }

    fn nodata(&self) -> Answer {
        let mut a = Answer::new(ResponseCode::NoError);
        a.authorities.push(self.soa());
        a
    }

    fn address_records(&self, owner: &Name, ips: &[IpAddr], qtype: RecordType) -> Vec<Record> {
        let ttl = self.config.ttl;
        ips.iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(a), RecordType::A | RecordType::ANY) => {
                    Some(Record::from_rdata(owner.clone(), ttl, RData::A(A(*a))))
                }
                (IpAddr::V6(a), RecordType::AAAA | RecordType::ANY) => Some(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::AAAA(AAAA(*a)),
                )),
                _ => None,
            })
            .collect()
    }

    /// `owner`'s addresses of the asked type, or NODATA when none is.
    fn addresses(&self, owner: &Name, ips: &[IpAddr], qtype: RecordType) -> Answer {
        let answers = self.address_records(owner, ips, qtype);
        if answers.is_empty() {
            return self.nodata();
        }
        Answer {
            answers,
            ..Answer::new(ResponseCode::NoError)
        }
    }

    /// The compiled records of Service `svc` in namespace `ns` (lower case).
    fn service_records(&self, ns: &str, svc: &str) -> Option<&Arc<ServiceRecords>> {
        self.services.get(&(ns.to_string(), svc.to_string()))
    }

    /// Answer a question for a name inside the cluster zone. `qname` keeps
    /// the asker's case (answers echo it); matching ignores case.
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Answer {
        if !self.synced {
            return Answer::new(ResponseCode::ServFail);
        }
        let zone_labels = self.config.zone.num_labels() as usize;
        let total = qname.num_labels() as usize;
        if total < zone_labels || !self.config.zone.zone_of(qname) {
            return Answer::new(ResponseCode::Refused);
        }
        // Labels below the zone, outermost last, lower case (a label that
        // is not UTF-8 matches nothing).
        let lower = qname.to_lowercase();
        let labels: Vec<&str> = lower
            .iter()
            .take(total - zone_labels)
            .map(|l| std::str::from_utf8(l).unwrap_or("\u{0}"))
            .collect();
        let ttl = self.config.ttl;
        match labels.as_slice() {
            [] => {
                let mut a = Answer::new(ResponseCode::NoError);
                match qtype {
                    RecordType::SOA => {
                        a.answers.push(self.soa());
                    }
                    RecordType::NS => {
                        a.answers.push(Record::from_rdata(
                            qname.clone(),
                            ttl,
                            RData::NS(NS(self.config.ns_name.clone())),
                        ));
                        a.additionals.extend(self.address_records(
                            &self.config.ns_name,
                            &self.config.nameservers,
                            RecordType::ANY,
                        ));
                    }
                    RecordType::ANY => {
                        a.answers.push(self.soa());
                        a.answers.push(Record::from_rdata(
                            qname.clone(),
                            ttl,
                            RData::NS(NS(self.config.ns_name.clone())),
                        ));
                    }
                    _ => return self.nodata(),
                }
                a
            }
            ["dns-version"] => match qtype {
                RecordType::TXT | RecordType::ANY => {
                    let mut a = Answer::new(ResponseCode::NoError);
                    a.answers.push(Record::from_rdata(
                        qname.clone(),
                        ttl,
                        RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
                    ));
                    a
                }
                _ => self.nodata(),
            },
            ["ns", "dns"] => self.addresses(qname, &self.config.nameservers, qtype),
            ["dns"] | ["svc"] | ["pod"] => self.nodata(),
            [ns, "svc"] => {
                if self.namespaces.contains_key(*ns) {
                    self.nodata()
                } else {
                    self.nxdomain()
                }
            }
            [svc, ns, "svc"] => self.service(qname, ns, svc, qtype),
            [first, svc, ns, "svc"] => {
                let Some(s) = self.service_records(ns, svc) else {
                    return self.nxdomain();
                };
                // `_<proto>.<svc>…` of a named port: an empty non-terminal.
                if s.ports.iter().any(|p| proto_label(p.protocol) == *first) {
                    return self.nodata();
                }
                let ServiceKind::Headless { endpoints } = &s.kind else {
                    return self.nxdomain();
                };
                let ips: Vec<IpAddr> = endpoints
                    .iter()
                    .filter(|e| e.hostname == *first)
                    .map(|e| e.ip)
                    .collect();
                if ips.is_empty() {
                    return self.nxdomain();
                }
                self.addresses(qname, &ips, qtype)
            }
            [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
                self.srv(qname, &port[1..], proto, ns, svc, qtype)
            }
            [addr, ns, "pod"] => self.pod(qname, addr, ns, qtype),
            _ => self.nxdomain(),
        }
    }

    fn service(&self, qname: &Name, ns: &str, svc: &str, qtype: RecordType) -> Answer {
        let Some(s) = self.service_records(ns, svc) else {
            return self.nxdomain();
        };
        let ttl = self.config.ttl;
        match &s.kind {
            ServiceKind::ExternalName(target) => {
                let mut a = Answer::new(ResponseCode::NoError);
                a.answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::CNAME(CNAME(target.clone())),
                ));
                if qtype != RecordType::CNAME && qtype != RecordType::ANY {
                    a.chase = Some(target.clone());
                }
                a
            }
            ServiceKind::ClusterIp { ips } => self.addresses(qname, ips, qtype),
            ServiceKind::Headless { endpoints } => {
                if endpoints.is_empty() {
                    // No ready endpoint: the name does not exist.
                    return self.nxdomain();
                }
                let ips: Vec<IpAddr> = endpoints.iter().map(|e| e.ip).collect();
                self.addresses(qname, &ips, qtype)
            }
        }
    }

    fn srv(
        &self,
        qname: &Name,
        port: &str,
        proto: &str,
        ns: &str,
        svc: &str,
        qtype: RecordType,
    ) -> Answer {
        let Some(s) = self.service_records(ns, svc) else {
            return self.nxdomain();
        };
        let Some(idx) = s
            .ports
            .iter()
            .position(|p| p.name == port && proto_label(p.protocol) == proto)
        else {
            return self.nxdomain();
        };
        let ttl = self.config.ttl;
        let mut a = Answer::new(ResponseCode::NoError);
        match &s.kind {
            ServiceKind::ClusterIp { ips } => {
                if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    return self.nodata();
                }
                a.answers.push(Record::from_rdata(
                    qname.clone(),
                    ttl,
                    RData::SRV(SRV::new(0, 100, s.ports[idx].port, s.name.clone())),
                ));
                a.additionals = self.address_records(&s.name, ips, RecordType::ANY);
            }
            ServiceKind::Headless { endpoints } => {
                let with_port: Vec<(&Endpoint, u16)> = endpoints
                    .iter()
                    .filter_map(|e| Some((e, e.ports.get(idx).copied().flatten()?)))
                    .collect();
                if with_port.is_empty() {
                    return self.nxdomain();
                }
                if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    return self.nodata();
                }
                // Equal weights that sum to 100 (rounded), as CoreDNS does.
                let weight = (100 / with_port.len()).max(1) as u16;
                for (e, p) in with_port {
                    let Ok(target) = s.name.prepend_label(e.hostname.as_bytes()) else {
                        continue;
                    };
                    a.answers.push(Record::from_rdata(
                        qname.clone(),
                        ttl,
                        RData::SRV(SRV::new(0, weight, p, target.clone())),
                    ));
                    a.additionals
                        .extend(self.address_records(&target, &[e.ip], RecordType::ANY));
                }
            }
            ServiceKind::ExternalName(_) => return self.nxdomain(),
        }
        a
    }

    fn pod(&self, qname: &Name, addr: &str, ns: &str, qtype: RecordType) -> Answer {
        let ip = match self.config.pods {
            PodRecords::Disabled => return self.nxdomain(),
            _ => match parse_dashed(addr) {
                Some(ip) => ip,
                None => return self.nxdomain(),
            },
        };
        if self.config.pods == PodRecords::Verified {
            let owned = self
                .pods
                .get(&ip)
                .is_some_and(|owners| owners.iter().any(|o| o.namespace.eq_ignore_ascii_case(ns)));
            if !owned {
                return self.nxdomain();
            }
        }
        self.addresses(qname, &[ip], qtype)
    }

    /// PTR for an address the cluster knows (Services, headless endpoints).
    /// `None`: not ours (forward it).
    pub fn lookup_reverse(&self, qname: &Name, qtype: RecordType) -> Option<Answer> {
        let ip = reverse_ip(qname)?;
        let targets = self.reverse.get(&ip)?;
        if !self.synced {
            return Some(Answer::new(ResponseCode::ServFail));
        }
        let mut a = Answer::new(ResponseCode::NoError);
        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
            return Some(a);
        }
        for t in targets {
            a.answers.push(Record::from_rdata(
                qname.clone(),
                self.config.ttl,
                RData::PTR(PTR(t.clone())),
            ));
        }
        Some(a)
    }
}

/// `a-b-c-d` (IPv4) or the dashed form of an IPv6 address.
pub fn parse_dashed(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use weft_model::view::{Backend, BackendPort, FrontendPort};

    pub(crate) fn svc(ns: &str, name: &str) -> ServiceEntry {
        ServiceEntry {
            namespace: ns.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    pub(crate) fn backend(
        ip: &str,
        hostname: Option<&str>,
        ready: bool,
        ports: &[(&str, u16)],
    ) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            node: Some("node-1".into()),
            hostname: hostname.map(str::to_string),
            target: None,
            zone: None,
            ports: ports
                .iter()
                .map(|(n, p)| BackendPort {
                    name: n.to_string(),
                    protocol: Protocol::TCP,
                    port: *p,
                })
                .collect(),
            ready,
            serving: ready,
            terminating: false,
        }
    }

    /// A zone with: shop/web (ClusterIP, named port http/TCP 80 and an
    /// unnamed UDP port), shop/db (headless, 2 ready endpoints of which one
    /// has a hostname, 1 unready, named port sql), shop/empty (headless, no
    /// ready endpoints), shop/ext (ExternalName), ops/v6 (IPv6 cluster IP).
    pub(crate) fn fixture(pods: PodRecords) -> Snapshot {
        let cfg = ZoneConfig::new(
            "Cluster.Local",
            5,
            pods,
            vec!["198.19.0.10".parse().unwrap()],
        )
        .unwrap();
        let mut snap = Snapshot::new(cfg);
        let zone = snap.config.zone.clone();
        let mut web = svc("shop", "web");
        web.cluster_ips = vec!["198.19.0.20".parse().unwrap()];
        web.ports = vec![
            FrontendPort {
                name: "http".into(),
                protocol: Protocol::TCP,
                port: 80,
                node_port: None,
            },
            FrontendPort {
                name: String::new(),
                protocol: Protocol::UDP,
                port: 53,
                node_port: None,
            },
        ];
        let mut db = svc("shop", "db");
        db.headless = true;
        db.ports = vec![FrontendPort {
            name: "sql".into(),
            protocol: Protocol::TCP,
            port: 5432,
            node_port: None,
        }];
        db.backends = vec![
            backend("198.18.128.5", Some("db-0"), true, &[("sql", 15432)]),
            backend("198.18.129.6", None, true, &[("sql", 15432)]),
            backend("198.18.129.7", Some("db-2"), false, &[("sql", 15432)]),
        ];
        let mut empty = svc("shop", "empty");
        empty.headless = true;
        empty.backends = vec![backend("198.18.129.8", None, false, &[])];
        let mut ext = svc("shop", "ext");
        ext.service_type = weft_model::view::ServiceType::ExternalName;
        ext.external_name = Some("Example.Test".into());
        let mut v6 = svc("ops", "v6");
        v6.cluster_ips = vec!["fd00::a".parse().unwrap()];
        for s in [web, db, empty, ext, v6] {
            let r = compile_service(&zone, &s);
            snap.put_service(s.key(), r);
        }
        snap.put_pod("shop", "client", &[], &["198.18.128.9".parse().unwrap()]);
        snap.synced = true;
        snap.rev = 7;
        snap
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn rdata(a: &Answer) -> Vec<String> {
        a.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn cluster_ip_a_aaaa_and_case() {
        let s = fixture(PodRecords::Disabled);
        let a = s.lookup(&n("WEB.shop.svc.cluster.LOCAL."), RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(rdata(&a), ["198.19.0.20"]);
        assert_eq!(a.answers[0].ttl, 5);
        // The asker's case is echoed in the owner name.
        assert_eq!(a.answers[0].name.to_ascii(), "WEB.shop.svc.cluster.LOCAL.");
        // AAAA of a v4-only Service: NODATA (NOERROR, SOA, no answers).
        let a = s.lookup(&n("web.shop.svc.cluster.local."), RecordType::AAAA);
        assert_eq!(
            (a.rcode, a.answers.len(), a.authorities.len()),
            (ResponseCode::NoError, 0, 1)
        );
        assert_eq!(a.authorities[0].record_type(), RecordType::SOA);
        let a = s.lookup(&n("v6.ops.svc.cluster.local."), RecordType::AAAA);
        assert_eq!(rdata(&a), ["fd00::a"]);
    }

    #[test]
    fn nxdomain_versus_nodata() {
        let s = fixture(PodRecords::Disabled);
        for (name, rcode) in [
            ("nope.shop.svc.cluster.local.", ResponseCode::NXDomain),
            ("shop.svc.cluster.local.", ResponseCode::NoError),
            ("nons.svc.cluster.local.", ResponseCode::NXDomain),
            ("svc.cluster.local.", ResponseCode::NoError),
            ("pod.cluster.local.", ResponseCode::NoError),
            ("cluster.local.", ResponseCode::NoError),
            ("a.b.c.d.e.f.cluster.local.", ResponseCode::NXDomain),
            ("_tcp.web.shop.svc.cluster.local.", ResponseCode::NoError),
            ("_udp.web.shop.svc.cluster.local.", ResponseCode::NXDomain),
            ("x.web.shop.svc.cluster.local.", ResponseCode::NXDomain),
            (
                "_http._udp.web.shop.svc.cluster.local.",
                ResponseCode::NXDomain,
            ),
        ] {
            let a = s.lookup(&n(name), RecordType::A);
            assert_eq!(a.rcode, rcode, "{name}");
            assert!(a.answers.is_empty(), "{name}");
            assert_eq!(a.authorities.len(), 1, "{name}: SOA in authority");
        }
    }

    #[test]
    fn srv_for_named_ports_only() {
        let s = fixture(PodRecords::Disabled);
        let a = s.lookup(
            &n("_http._tcp.web.shop.svc.cluster.local."),
            RecordType::SRV,
        );
        assert_eq!(rdata(&a), ["0 100 80 web.shop.svc.cluster.local."]);
        assert_eq!(a.additionals.len(), 1, "the target's A as additional");
        // The unnamed UDP port has no SRV record.
        let a = s.lookup(&n("_._udp.web.shop.svc.cluster.local."), RecordType::SRV);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        // A of an SRV name: NODATA.
        let a = s.lookup(&n("_http._tcp.web.shop.svc.cluster.local."), RecordType::A);
        assert_eq!((a.rcode, a.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn headless_records() {
        let s = fixture(PodRecords::Disabled);
        let a = s.lookup(&n("db.shop.svc.cluster.local."), RecordType::A);
        let mut ips = rdata(&a);
        ips.sort();
        assert_eq!(
            ips,
            ["198.18.128.5", "198.18.129.6"],
            "ready endpoints only"
        );
        let a = s.lookup(&n("db-0.db.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(&a), ["198.18.128.5"]);
        // No hostname: the system-assigned one (dashed address).
        let a = s.lookup(&n("198-18-129-6.db.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(&a), ["198.18.129.6"]);
        // The unready endpoint's hostname does not exist.
        let a = s.lookup(&n("db-2.db.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        let a = s.lookup(&n("_sql._tcp.db.shop.svc.cluster.local."), RecordType::SRV);
        let mut srv = rdata(&a);
        srv.sort();
        assert_eq!(
            srv,
            [
                "0 50 15432 198-18-129-6.db.shop.svc.cluster.local.",
                "0 50 15432 db-0.db.shop.svc.cluster.local."
            ]
        );
        assert_eq!(a.additionals.len(), 2);
        // No ready endpoint: NXDOMAIN for the name and its SRV.
        let a = s.lookup(&n("empty.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn external_name_is_a_cname_to_chase() {
        let s = fixture(PodRecords::Disabled);
        let a = s.lookup(&n("ext.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(rdata(&a), ["example.test."]);
        assert_eq!(a.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(a.chase, Some(n("example.test.")));
        let a = s.lookup(&n("ext.shop.svc.cluster.local."), RecordType::CNAME);
        assert_eq!(a.chase, None);
    }

    #[test]
    fn apex_version_and_nameserver() {
        let s = fixture(PodRecords::Disabled);
        let a = s.lookup(&n("dns-version.cluster.local."), RecordType::TXT);
        assert_eq!(rdata(&a), ["1.1.0"]);
        let a = s.lookup(&n("cluster.local."), RecordType::SOA);
        assert_eq!(a.answers[0].record_type(), RecordType::SOA);
        assert!(
            rdata(&a)[0].contains(" 7 "),
            "serial = view revision: {:?}",
            rdata(&a)
        );
        let a = s.lookup(&n("cluster.local."), RecordType::NS);
        assert_eq!(rdata(&a), ["ns.dns.cluster.local."]);
        assert_eq!(a.additionals[0].data.to_string(), "198.19.0.10");
        let a = s.lookup(&n("ns.dns.cluster.local."), RecordType::A);
        assert_eq!(rdata(&a), ["198.19.0.10"]);
    }

    #[test]
    fn ptr_for_services_and_endpoints() {
        let s = fixture(PodRecords::Disabled);
        let a = s
            .lookup_reverse(&n("20.0.19.198.in-addr.arpa."), RecordType::PTR)
            .unwrap();
        assert_eq!(rdata(&a), ["web.shop.svc.cluster.local."]);
        let a = s
            .lookup_reverse(&n("5.128.18.198.in-addr.arpa."), RecordType::PTR)
            .unwrap();
        assert_eq!(rdata(&a), ["db-0.db.shop.svc.cluster.local."]);
        let v6 = "a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        let a = s.lookup_reverse(&n(v6), RecordType::PTR).unwrap();
        assert_eq!(rdata(&a), ["v6.ops.svc.cluster.local."]);
        // Not a cluster address, or not a whole address: not ours.
        assert!(s
            .lookup_reverse(&n("8.8.8.8.in-addr.arpa."), RecordType::PTR)
            .is_none());
        assert!(s
            .lookup_reverse(&n("19.198.in-addr.arpa."), RecordType::PTR)
            .is_none());
    }

    #[test]
    fn pod_records_by_mode() {
        let q = n("198-18-128-9.shop.pod.cluster.local.");
        let other_ns = n("198-18-128-9.ops.pod.cluster.local.");
        let s = fixture(PodRecords::Disabled);
        assert_eq!(s.lookup(&q, RecordType::A).rcode, ResponseCode::NXDomain);
        let s = fixture(PodRecords::Insecure);
        assert_eq!(rdata(&s.lookup(&other_ns, RecordType::A)), ["198.18.128.9"]);
        let s = fixture(PodRecords::Verified);
        assert_eq!(rdata(&s.lookup(&q, RecordType::A)), ["198.18.128.9"]);
        assert_eq!(
            s.lookup(&other_ns, RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        let none = n("198-18-128-99.shop.pod.cluster.local.");
        assert_eq!(s.lookup(&none, RecordType::A).rcode, ResponseCode::NXDomain);
        assert_eq!(
            s.pod_namespace("198.18.128.9".parse().unwrap()),
            Some("shop")
        );
    }

    #[test]
    fn before_the_first_view_cluster_names_are_servfail() {
        let mut s = fixture(PodRecords::Disabled);
        s.synced = false;
        let a = s.lookup(&n("web.shop.svc.cluster.local."), RecordType::A);
        assert_eq!(a.rcode, ResponseCode::ServFail);
    }

    #[test]
    fn updates_replace_and_remove_records() {
        let mut s = fixture(PodRecords::Disabled);
        let before = s.clone();
        s.put_service(("shop".into(), "web".into()), None);
        assert_eq!(
            s.lookup(&n("web.shop.svc.cluster.local."), RecordType::A)
                .rcode,
            ResponseCode::NXDomain
        );
        assert!(s
            .lookup_reverse(&n("20.0.19.198.in-addr.arpa."), RecordType::PTR)
            .is_none());
        // The earlier snapshot is untouched (readers of it see no change).
        assert_eq!(
            rdata(&before.lookup(&n("web.shop.svc.cluster.local."), RecordType::A)),
            ["198.19.0.20"]
        );
        // Namespace bookkeeping: removing every Service of `ops` removes `ops.svc`.
        s.put_service(("ops".into(), "v6".into()), None);
        assert_eq!(
            s.lookup(&n("ops.svc.cluster.local."), RecordType::A).rcode,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn config_errors_name_the_value() {
        let e = ZoneConfig::new("bad..zone", 5, PodRecords::Disabled, vec![]).unwrap_err();
        assert!(e.to_string().contains("bad..zone"), "{e}");
        let e = ZoneConfig::new("cluster.local", 0, PodRecords::Disabled, vec![]).unwrap_err();
        assert!(e.to_string().contains("ttl 0"), "{e}");
    }
}
