//! `netctl dns NAME`: resolve a name the way a pod's libc resolver would on
//! this node, and show every step of its search path.
//!
//! The pod's resolver configuration is rebuilt from the node state file the
//! agent writes (`dns: {nameservers, search, options}`): the cluster DNS
//! address, the search list `<ns>.svc.<zone> svc.<zone> <zone>` followed by
//! the node's own search domains, and `ndots`. The steps follow glibc's
//! `res_search`: a name with fewer than `ndots` dots tries each search suffix
//! first and then the name as given, any other name the other way round; a
//! name ending in `.` is asked once. The walk stops at the first answer.
//!
//! With `--from POD` the queries leave from inside the pod's network
//! namespace (found through the CNI plugin's IPAM claim), so the server sees
//! the pod's own address and may walk the rest of the search path itself
//! (weft-dns answers the first step with a CNAME to the first name that
//! exists); the output says when it did. Without `--from` the queries leave
//! from the node, searching like a pod of `default` (or of `-n NS`).

use anyhow::{bail, Context as _, Result};
use hickory_proto::op::{Edns, Header, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable as _, BinDecoder};
use std::fmt;
use std::io::{self, Read as _, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use weft_model::node_state::{Claim, NodeState};

/// Per-try timeout and tries, as a pod's resolver (`timeout:2 attempts:2`).
pub const TIMEOUT: Duration = Duration::from_secs(2);
pub const TRIES: u32 = 2;
/// glibc's default when the options do not say, and its cap.
const DEFAULT_NDOTS: u8 = 5;
const MAX_NDOTS: u8 = 15;
/// The EDNS payload advertised with the `edns0` option.
const EDNS_PAYLOAD: u16 = 1232;

#[derive(Debug, clap::Args)]
pub struct DnsArgs {
    /// The name to resolve, as a pod's program would pass it (`web`,
    /// `web.shop`, `example.com.`); an IP address asks for its PTR record.
    #[arg(value_parser = parse_name)]
    pub name: Target,
    /// Resolve as this pod (`ns/name`, or `name` in `-n`/default): the
    /// queries leave from inside its network namespace on this node.
    #[arg(long, value_name = "POD")]
    pub from: Option<String>,
    /// Record type to ask for [default: A, PTR for an IP address].
    #[arg(long = "type", short = 't', value_name = "TYPE", value_parser = parse_type)]
    pub qtype: Option<RecordType>,
    /// DNS server `IP` or `IP:PORT` [default: the node state's first
    /// nameserver]. `--server ADDR` with an address (not a URL) means this too.
    #[arg(long, value_name = "ADDR")]
    pub nameserver: Option<String>,
    /// The node state file the agent writes (nameserver, search, options).
    #[arg(
        long,
        env = "WEFT_NODE_STATE",
        default_value = "/run/weft/node.json",
        value_name = "PATH"
    )]
    pub node_state: PathBuf,
    /// The CNI plugin's IPAM directory of this node's network (pod claims).
    #[arg(
        long,
        env = "WEFT_IPAM_DIR",
        default_value = "/var/lib/weft/ipam/weft",
        value_name = "DIR"
    )]
    pub ipam_dir: PathBuf,
    /// Cluster domain [default: from the node state's `svc.<zone>` search
    /// entry, else cluster.local].
    #[arg(long, env = "WEFT_CLUSTER_DOMAIN", value_name = "ZONE")]
    pub cluster_domain: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_parser = ["json"])]
    pub output: Option<String>,
}

// ---- input ----

/// What NAME asks about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A domain name as typed (without its trailing dot) and whether it had one.
    Name { text: String, absolute: bool },
    /// An address: its reverse name, asked once.
    Address(IpAddr),
}

impl Target {
    pub fn default_type(&self) -> RecordType {
        match self {
            Target::Name { .. } => RecordType::A,
            Target::Address(_) => RecordType::PTR,
        }
    }
}

/// As typed.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name { text, absolute } => {
                write!(f, "{text}{}", if *absolute { "." } else { "" })
            }
            Target::Address(ip) => write!(f, "{ip}"),
        }
    }
}

/// NAME: an IP address, or a domain name of letters, digits, `-` and `_`
/// (labels of 1–63 bytes, 253 bytes in all).
pub fn parse_name(s: &str) -> Result<Target, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Target::Address(ip));
    }
    let absolute = s.ends_with('.');
    let text = s.strip_suffix('.').unwrap_or(s);
    if text.is_empty() {
        return Err("empty name".into());
    }
    if text.len() > 253 {
        return Err(format!("{} bytes long (at most 253)", text.len()));
    }
    for label in text.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row, or a leading dot)".into());
        }
        if label.len() > 63 {
            return Err(format!(
                "label \"{label}\" is {} bytes long (at most 63)",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "invalid character {c:?} in label \"{label}\" (letters, digits, '-' and '_' only)"
            ));
        }
    }
    Ok(Target::Name {
        text: text.to_string(),
        absolute,
    })
}

/// `--type`: a record type a resolver asks (`A`, `srv`, `TYPE65`).
pub fn parse_type(s: &str) -> Result<RecordType, String> {
    let up = s.to_ascii_uppercase();
    let t = match up.strip_prefix("TYPE").map(str::parse::<u16>) {
        Some(Ok(n)) => RecordType::from(n),
        _ => up.parse::<RecordType>().map_err(|_| {
            "unknown record type (A, AAAA, SRV, PTR, TXT, CNAME, MX, NS, SOA, CAA, ANY, or TYPE<number>)"
                .to_string()
        })?,
    };
    if matches!(
        t,
        RecordType::AXFR | RecordType::IXFR | RecordType::OPT | RecordType::TSIG
    ) {
        return Err(format!("{t} is not a question a resolver asks"));
    }
    Ok(t)
}

/// `IP` (port 53) or `IP:PORT` (`[v6]:PORT`).
pub fn parse_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| "expected IP or IP:PORT (e.g. 198.19.0.10 or 198.19.0.10:53)".into())
}

/// `--from`: `ns/name` or `name` (in `namespace`).
pub fn parse_pod(s: &str, namespace: Option<&str>) -> Result<(String, String)> {
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => {
            if let Some(flag) = namespace.filter(|f| *f != ns) {
                bail!("--from {s:?} names namespace {ns:?} but -n says {flag:?}");
            }
            (ns, name)
        }
        None => (namespace.unwrap_or(crate::DEFAULT_NAMESPACE), s),
    };
    let errs = weft_model::validate::dns1123_label_errors(ns);
    if !errs.is_empty() {
        bail!(
            "--from {s:?}: namespace {ns:?} is not valid: {}",
            errs.join("; ")
        );
    }
    let errs = weft_model::validate::dns1123_subdomain_errors(name);
    if !errs.is_empty() {
        bail!(
            "--from {s:?}: pod name {name:?} is not valid: {}",
            errs.join("; ")
        );
    }
    Ok((ns.to_string(), name.to_string()))
}

// ---- the pod's resolver configuration ----

/// What a pod's resolv.conf would say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverConfig {
    pub nameserver: SocketAddr,
    /// Search domains, without trailing dots.
    pub search: Vec<String>,
    pub ndots: u8,
    /// `options edns0`: advertise a larger UDP payload.
    pub edns: bool,
}

/// The zone from the node state's search list (`svc.<zone>`), if any.
pub fn zone_from_search(search: &[String]) -> Option<String> {
    search
        .iter()
        .map(|s| s.trim_end_matches('.'))
        .find_map(|s| s.strip_prefix("svc."))
        .filter(|z| !z.is_empty())
        .map(str::to_string)
}

/// A pod of `namespace`'s search list: `<ns>.svc.<zone> svc.<zone> <zone>`,
/// then the node's own domains (`node_search` minus the cluster's entries).
pub fn pod_search(zone: &str, namespace: &str, node_search: &[String]) -> Vec<String> {
    let zone = zone.trim_end_matches('.');
    let svc = format!("svc.{zone}");
    let mut out = vec![format!("{namespace}.{svc}"), svc.clone(), zone.to_string()];
    for s in node_search {
        let s = s.trim_end_matches('.');
        let clusters = s == zone || s == svc || s.ends_with(&format!(".{svc}"));
        if !s.is_empty() && !clusters && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

/// `ndots:N` (capped at 15 like glibc) and `edns0` from resolv.conf options.
pub fn parse_options(options: &[String]) -> (u8, bool) {
    let mut ndots = DEFAULT_NDOTS;
    let mut edns = false;
    for o in options {
        if let Some(n) = o.strip_prefix("ndots:") {
            if let Ok(n) = n.parse::<u32>() {
                ndots = n.min(u32::from(MAX_NDOTS)) as u8;
            }
        } else if o == "edns0" {
            edns = true;
        }
    }
    (ndots, edns)
}

/// The names a glibc resolver asks for `target`, in order.
pub fn candidates(target: &Target, search: &[String], ndots: u8) -> Vec<Name> {
    let (text, absolute) = match target {
        Target::Address(ip) => return vec![Name::from(*ip)],
        Target::Name { text, absolute } => (text, *absolute),
    };
    // Names over 253 bytes with their suffix are skipped, as glibc does
    // (hickory refuses them: over 255 bytes on the wire).
    let fqdn = |s: String| Name::from_ascii(s).ok();
    let bare = fqdn(format!("{text}."));
    if absolute {
        return bare.into_iter().collect();
    }
    let searched = search
        .iter()
        .filter_map(|d| fqdn(format!("{text}.{}.", d.trim_end_matches('.'))));
    let dots = text.matches('.').count();
    if dots >= usize::from(ndots) {
        bare.into_iter().chain(searched).collect()
    } else {
        searched.chain(bare).collect()
    }
}

// ---- one exchange ----

/// Where and how to ask.
#[derive(Clone, Copy, Debug)]
pub struct Exchange {
    pub server: SocketAddr,
    pub timeout: Duration,
    pub tries: u32,
    pub edns: bool,
}

/// A server's reply to one step.
#[derive(Clone, Debug)]
pub struct Reply {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    /// Truncated over UDP and asked again over TCP.
    pub tcp: bool,
}

/// Why a step got no reply.
#[derive(Debug)]
pub enum ExchangeError {
    /// Every try timed out.
    Timeout {
        server: SocketAddr,
        tries: u32,
        each: Duration,
    },
    /// Nothing listens there (ICMP port unreachable, TCP RST).
    Refused { server: SocketAddr },
    Io {
        what: &'static str,
        server: SocketAddr,
        source: io::Error,
    },
    /// A reply that does not parse, or answers another question.
    BadReply { server: SocketAddr, why: String },
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Timeout {
                server,
                tries,
                each,
            } => write!(
                f,
                "no answer from {server} after {tries} tries of {}s",
                each.as_secs_f64()
            ),
            ExchangeError::Refused { server } => {
                write!(f, "{server} refused the query (nothing listening there)")
            }
            ExchangeError::Io {
                what,
                server,
                source,
            } => write!(f, "{what} {server}: {source}"),
            ExchangeError::BadReply { server, why } => write!(f, "bad reply from {server}: {why}"),
        }
    }
}

impl std::error::Error for ExchangeError {}

impl Exchange {
    /// Ask `name`/`qtype` over UDP; again over TCP when the reply is truncated.
    pub fn ask(&self, name: &Name, qtype: RecordType) -> Result<Reply, ExchangeError> {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name.clone(), qtype));
        if self.edns {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD);
            q.edns = Some(e);
        }
        let wire = q.to_vec().map_err(|e| ExchangeError::BadReply {
            server: self.server,
            why: format!("encoding the query: {e}"),
        })?;
        let id = q.metadata.id;
        let (m, tcp) = match self.udp(&wire, id, name, qtype)? {
            Some(m) => (m, false),
            None => match self.receive(&self.tcp(&wire)?, id, name, qtype)? {
                Received::Reply(m) => (m, true),
                Received::Truncated => return Err(self.bad("truncated over TCP as well".into())),
                Received::Stray(why) => return Err(self.bad(why)),
            },
        };
        Ok(Reply {
            rcode: m.metadata.response_code,
            answers: m.answers,
            tcp,
        })
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> ExchangeError + '_ {
        move |source| match source.kind() {
            io::ErrorKind::ConnectionRefused => ExchangeError::Refused {
                server: self.server,
            },
            _ => ExchangeError::Io {
                what,
                server: self.server,
                source,
            },
        }
    }

    fn bad(&self, why: String) -> ExchangeError {
        ExchangeError::BadReply {
            server: self.server,
            why,
        }
    }

    /// The first datagram that answers this query (others are ignored, as
    /// a resolver does); `None` when it is truncated.
    fn udp(
        &self,
        wire: &[u8],
        id: u16,
        name: &Name,
        qtype: RecordType,
    ) -> Result<Option<Message>, ExchangeError> {
        let bind: SocketAddr = if self.server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).map_err(self.io("binding a UDP socket for"))?;
        // Connected: ICMP errors come back as errors instead of timeouts.
        sock.connect(self.server)
            .map_err(self.io("connecting a UDP socket to"))?;
        let mut buf = vec![0u8; 65535];
        for _ in 0..self.tries.max(1) {
            sock.send(wire).map_err(self.io("sending to"))?;
            let deadline = Instant::now() + self.timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                sock.set_read_timeout(Some(left))
                    .map_err(self.io("setting a timeout for"))?;
                match sock.recv(&mut buf) {
                    Ok(n) => match self.receive(&buf[..n], id, name, qtype)? {
                        Received::Reply(m) => return Ok(Some(m)),
                        Received::Truncated => return Ok(None),
                        Received::Stray(_) => {}
                    },
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(self.io("receiving from")(e)),
                }
            }
        }
        Err(ExchangeError::Timeout {
            server: self.server,
            tries: self.tries.max(1),
            each: self.timeout,
        })
    }

    fn tcp(&self, wire: &[u8]) -> Result<Vec<u8>, ExchangeError> {
        let timeout = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ExchangeError::Timeout {
                server: self.server,
                tries: 1,
                each: self.timeout,
            },
            _ => self.io("asking over TCP")(e),
        };
        let mut s = TcpStream::connect_timeout(&self.server, self.timeout).map_err(timeout)?;
        s.set_read_timeout(Some(self.timeout)).map_err(timeout)?;
        s.set_write_timeout(Some(self.timeout)).map_err(timeout)?;
        let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(wire);
        s.write_all(&framed).map_err(timeout)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(timeout)?;
        let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut raw).map_err(timeout)?;
        Ok(raw)
    }

    /// What `raw` is to query `id` for `name`/`qtype`, decoded once; an
    /// error when it is ours by id but does not parse.
    fn receive(
        &self,
        raw: &[u8],
        id: u16,
        name: &Name,
        qtype: RecordType,
    ) -> Result<Received, ExchangeError> {
        let Ok(header) = Header::read(&mut BinDecoder::new(raw)) else {
            return Ok(Received::Stray("shorter than a DNS header".into()));
        };
        if header.id != id || header.message_type != MessageType::Response {
            return Ok(Received::Stray(format!(
                "id {} is not a response to {id}",
                header.id
            )));
        }
        // A truncated reply may not parse past its header.
        if header.truncation {
            return Ok(Received::Truncated);
        }
        let m = Message::from_vec(raw).map_err(|e| self.bad(e.to_string()))?;
        if let Some(q) = m.queries.first() {
            if q.name() != name || q.query_type() != qtype {
                return Ok(Received::Stray(format!(
                    "answers {} {} instead",
                    q.name(),
                    q.query_type()
                )));
            }
        }
        Ok(Received::Reply(m))
    }
}

/// A message received for a query.
enum Received {
    /// Not the response to it (another id, a query, another question): a
    /// resolver ignores such a datagram; over TCP it is a bad reply.
    Stray(String),
    /// The response, truncated: ask again over TCP.
    Truncated,
    Reply(Message),
}

// ---- the walk ----

/// One query of the walk and what came back.
#[derive(Debug)]
pub struct Step {
    pub name: Name,
    pub latency: Duration,
    pub result: Result<Reply, ExchangeError>,
}

/// How the walk ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The last step had answers (the resolver stops at the first).
    Resolved,
    /// NXDOMAIN (or no records of the type) at every step.
    NotFound,
    /// A server error or no reply stopped it, or SERVFAIL left it unresolved.
    Failed(String),
}

/// A whole resolution.
#[derive(Debug)]
pub struct Walk {
    pub qtype: RecordType,
    /// Every name the resolver would try, in order.
    pub candidates: Vec<Name>,
    /// The steps asked (a prefix of `candidates`).
    pub steps: Vec<Step>,
    pub verdict: Verdict,
}

impl Walk {
    pub fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Resolved => 0,
            Verdict::NotFound => 1,
            Verdict::Failed(_) => 2,
        }
    }

    /// When resolved with a CNAME from the last step's name to a later
    /// candidate: that candidate, the server having walked the search path.
    pub fn server_walked(&self) -> Option<usize> {
        if self.verdict != Verdict::Resolved {
            return None;
        }
        let last = self.steps.last()?;
        let first = last.result.as_ref().ok()?.answers.first()?;
        let RData::CNAME(target) = &first.data else {
            return None;
        };
        if first.name != last.name {
            return None;
        }
        let i = self.steps.len();
        self.candidates[i..]
            .iter()
            .position(|c| *c == target.0)
            .map(|j| i + j)
    }
}

/// Ask each candidate in turn with `ask`, stopping like glibc's
/// `res_search`: at the first answer, or at an error other than NXDOMAIN,
/// no data or SERVFAIL.
pub fn walk(
    candidates: Vec<Name>,
    qtype: RecordType,
    mut ask: impl FnMut(&Name, RecordType) -> Result<Reply, ExchangeError>,
) -> Walk {
    let mut steps = Vec::new();
    let mut verdict = None;
    for (i, name) in candidates.iter().enumerate() {
        let t = Instant::now();
        let result = ask(name, qtype);
        let latency = t.elapsed();
        let stop = match &result {
            Ok(r) if r.rcode == ResponseCode::NoError && !r.answers.is_empty() => {
                Some(Verdict::Resolved)
            }
            Ok(r) if is_walk_on(r.rcode) => None,
            Ok(r) => Some(Verdict::Failed(format!(
                "{} at step {} (the resolver stops there)",
                rcode_name(r.rcode),
                i + 1
            ))),
            Err(e) => Some(Verdict::Failed(format!("step {}: {e}", i + 1))),
        };
        steps.push(Step {
            name: name.clone(),
            latency,
            result,
        });
        if let Some(v) = stop {
            verdict = Some(v);
            break;
        }
    }
    let verdict = verdict.unwrap_or_else(|| {
        let servfail: Vec<String> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.result
                    .as_ref()
                    .is_ok_and(|r| r.rcode == ResponseCode::ServFail)
            })
            .map(|(i, _)| (i + 1).to_string())
            .collect();
        if servfail.is_empty() {
            Verdict::NotFound
        } else {
            Verdict::Failed(format!(
                "SERVFAIL at step {} (a temporary failure, not a missing name)",
                servfail.join(", ")
            ))
        }
    });
    Walk {
        qtype,
        candidates,
        steps,
        verdict,
    }
}

/// glibc goes on to the next name after these.
fn is_walk_on(rcode: ResponseCode) -> bool {
    matches!(
        rcode,
        ResponseCode::NXDomain | ResponseCode::NoError | ResponseCode::ServFail
    )
}

/// `NXDOMAIN`, as dig prints rcodes.
pub fn rcode_name(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

// ---- where the queries leave from ----

/// Who asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// From inside the pod's network namespace.
    Pod {
        namespace: String,
        name: String,
        ip: String,
        netns: String,
    },
    /// From the node, searching like a pod of `namespace`.
    Node { namespace: String },
}

impl Origin {
    pub fn namespace(&self) -> &str {
        match self {
            Origin::Pod { namespace, .. } | Origin::Node { namespace } => namespace,
        }
    }
}

/// The pod's claim on this node: its address and network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodClaim {
    pub ip: String,
    pub netns: Option<String>,
}

/// Find pod `ns/name` among the IPAM claims in `dir` (file name = address).
pub fn find_claim(dir: &Path, ns: &str, name: &str) -> Result<Option<PodClaim>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut found: Vec<(Claim, String)> = Vec::new();
    for e in entries.flatten() {
        let ip = e.file_name().to_string_lossy().into_owned();
        if ip.parse::<IpAddr>().is_err() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Some(claim) = Claim::decode(&text) else {
            continue;
        };
        if claim.pod.namespace.as_deref() == Some(ns) && claim.pod.name.as_deref() == Some(name) {
            found.push((claim, ip));
        }
    }
    // The pod's main interface first, then a claim with a namespace, then a stable order.
    Ok(found
        .into_iter()
        .min_by_key(|(c, ip)| (c.ifname != "eth0", c.netns.is_none(), ip.clone()))
        .map(|(c, ip)| PodClaim { ip, netns: c.netns }))
}

/// Run `f` on a fresh thread inside the network namespace at `path`; the
/// thread ends afterwards, so nothing else ever runs in the pod's namespace.
pub fn in_netns<T: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let ns = std::fs::File::open(path)
        .with_context(|| format!("opening the pod's network namespace {path}"))?;
    std::thread::Builder::new()
        .name("netctl-dns".into())
        .spawn(move || {
            // SAFETY: setns on an open namespace descriptor; it changes only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .context("starting a thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the thread inside the pod's network namespace panicked"))?
        .with_context(|| format!("entering the pod's network namespace {path} (setns)"))
}

// ---- output ----

/// Everything shown about one resolution.
#[derive(Debug)]
pub struct Report {
    pub target: Target,
    pub origin: Origin,
    pub config: ResolverConfig,
    pub walk: Walk,
    /// Things the reader should know (defaults used, fallbacks).
    pub notes: Vec<String>,
}

/// One answer record: `owner → target  (CNAME, ttl N)` or `owner  TYPE  data  (ttl N)`.
pub fn render_record(r: &Record) -> String {
    match &r.data {
        RData::CNAME(t) => format!("{} → {}  (CNAME, ttl {})", r.name, t.0, r.ttl),
        data => format!("{}  {}  {data}  (ttl {})", r.name, r.record_type(), r.ttl),
    }
}

/// `name → cname → … → value, value`: where the answer of a step leads.
pub fn answer_chain(asked: &Name, answers: &[Record]) -> String {
    let mut parts = vec![asked.to_string()];
    let mut at = asked.clone();
    let mut seen = 0;
    while let Some(next) = answers.iter().find_map(|r| match &r.data {
        RData::CNAME(t) if r.name == at => Some(t.0.clone()),
        _ => None,
    }) {
        parts.push(next.to_string());
        at = next;
        seen += 1;
        if seen > answers.len() {
            break;
        }
    }
    let values: Vec<String> = answers
        .iter()
        .filter(|r| r.name == at && !matches!(r.data, RData::CNAME(_)))
        .map(|r| r.data.to_string())
        .collect();
    if !values.is_empty() {
        parts.push(values.join(", "));
    }
    parts.join(" → ")
}

/// The human form.
pub fn render(rep: &Report) -> String {
    let mut out = String::new();
    let w = &rep.walk;
    let cfg = &rep.config;
    let name = &rep.target;
    match &rep.origin {
        Origin::Pod {
            namespace,
            name: pod,
            ip,
            ..
        } => out.push_str(&format!(
            "resolving {name} {} as pod {namespace}/{pod} ({ip}), from inside its network namespace\n",
            w.qtype
        )),
        Origin::Node { namespace } => out.push_str(&format!(
            "resolving {name} {} from this node, with the search list of a pod of namespace {namespace} \
             (the server sees the node's address, not a pod's: it does not walk the search path itself)\n",
            w.qtype
        )),
    }
    out.push_str(&format!(
        "nameserver {}   search {}   ndots {}{}\n",
        cfg.nameserver,
        cfg.search.join(" "),
        cfg.ndots,
        if cfg.edns { "   edns0" } else { "" }
    ));
    match &rep.target {
        Target::Address(_) => out.push_str(&format!(
            "{name} is an address: its reverse name, asked once\n"
        )),
        Target::Name { absolute: true, .. } => {
            out.push_str(&format!("{name} ends with '.': asked as is, once\n"))
        }
        Target::Name { text, .. } => {
            let dots = text.matches('.').count();
            if dots >= usize::from(cfg.ndots) {
                out.push_str(&format!(
                    "{name} has {dots} dots (>= ndots {}): the name as given first, then the search list\n",
                    cfg.ndots
                ));
            } else {
                out.push_str(&format!(
                    "{name} has {dots} dot{} (< ndots {}): the search list first, then the name as given\n",
                    if dots == 1 { "" } else { "s" },
                    cfg.ndots
                ));
            }
        }
    }
    for n in &rep.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out.push('\n');
    let total = w.candidates.len();
    for (i, s) in w.steps.iter().enumerate() {
        let head = format!("step {}/{total}  {}  {}", i + 1, s.name, w.qtype);
        match &s.result {
            Ok(r) => {
                let nodata = r.rcode == ResponseCode::NoError && r.answers.is_empty();
                out.push_str(&format!(
                    "{head}  {}{}{}  {}µs\n",
                    rcode_name(r.rcode),
                    if nodata { " (no records)" } else { "" },
                    if r.tcp {
                        "  (truncated over UDP, asked again over TCP)"
                    } else {
                        ""
                    },
                    s.latency.as_micros()
                ));
                for a in &r.answers {
                    out.push_str(&format!("    {}\n", render_record(a)));
                }
            }
            Err(e) => out.push_str(&format!(
                "{head}  error: {e}  {}µs\n",
                s.latency.as_micros()
            )),
        }
    }
    if let Some(j) = w.server_walked() {
        out.push_str(&format!(
            "    server walked the search path: a CNAME to step {}'s name {}\n",
            j + 1,
            w.candidates[j]
        ));
    }
    out.push('\n');
    let asked = w.steps.len();
    match &w.verdict {
        Verdict::Resolved => {
            // The walk stopped at the step that answered: the last one.
            if let Some(s) = w.steps.last() {
                let answers = s.result.as_ref().map(|r| &r.answers[..]).unwrap_or(&[]);
                out.push_str(&format!(
                    "resolved at step {asked} of {total}: {}\n",
                    answer_chain(&s.name, answers)
                ));
            }
        }
        Verdict::NotFound => {
            let nodata = w.steps.iter().any(|s| {
                s.result
                    .as_ref()
                    .is_ok_and(|r| r.rcode == ResponseCode::NoError)
            });
            if nodata {
                out.push_str(&format!(
                    "not resolved: no {} records at any of the {asked} steps (NOERROR without data where the name exists, NXDOMAIN elsewhere)\n",
                    w.qtype
                ));
            } else {
                out.push_str(&format!(
                    "not resolved: NXDOMAIN at every one of the {asked} steps\n"
                ));
            }
        }
        Verdict::Failed(why) => out.push_str(&format!("not resolved: {why}\n")),
    }
    if asked < total && w.verdict == Verdict::Resolved {
        out.push_str(&format!(
            "({} later step{} not asked: the resolver stops at the first answer)\n",
            total - asked,
            if total - asked == 1 { "" } else { "s" }
        ));
    }
    out
}

fn record_json(r: &Record) -> serde_json::Value {
    serde_json::json!({
        "name": r.name.to_string(),
        "type": r.record_type().to_string(),
        "ttl": r.ttl,
        "data": r.data.to_string(),
    })
}

/// The `-o json` form.
pub fn to_json(rep: &Report) -> serde_json::Value {
    let w = &rep.walk;
    let from = match &rep.origin {
        Origin::Pod {
            namespace,
            name,
            ip,
            netns,
        } => serde_json::json!({"pod": format!("{namespace}/{name}"), "ip": ip, "netns": netns}),
        Origin::Node { namespace } => serde_json::json!({"node": true, "namespace": namespace}),
    };
    let mut steps: Vec<serde_json::Value> = w
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = serde_json::json!({
                "step": i + 1,
                "name": s.name.to_string(),
                "type": w.qtype.to_string(),
                "latencyMicros": s.latency.as_micros() as u64,
            });
            match &s.result {
                Ok(r) => {
                    v["rcode"] = rcode_name(r.rcode).into();
                    v["transport"] = if r.tcp { "tcp" } else { "udp" }.into();
                    v["answers"] = r.answers.iter().map(record_json).collect();
                }
                Err(e) => v["error"] = e.to_string().into(),
            }
            v
        })
        .collect();
    if let (Some(j), Some(last)) = (w.server_walked(), steps.last_mut()) {
        last["serverWalked"] =
            serde_json::json!({"step": j + 1, "target": w.candidates[j].to_string()});
    }
    let (status, detail) = match &w.verdict {
        Verdict::Resolved => ("resolved", serde_json::json!(w.steps.len())),
        Verdict::NotFound => ("notFound", serde_json::Value::Null),
        Verdict::Failed(why) => ("failed", serde_json::json!(why)),
    };
    let mut v = serde_json::json!({
        "name": rep.target.to_string(),
        "type": w.qtype.to_string(),
        "from": from,
        "nameserver": rep.config.nameserver.to_string(),
        "search": rep.config.search,
        "ndots": rep.config.ndots,
        "candidates": w.candidates.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "steps": steps,
        "status": status,
        "notes": rep.notes,
    });
    match status {
        "resolved" => v["resolvedAt"] = detail,
        "failed" => v["reason"] = detail,
        _ => {}
    }
    v
}

// ---- the command ----

/// Settle who asks and with which configuration (reads the node state and
/// the pod's claim).
pub fn prepare(
    args: &DnsArgs,
    namespace: Option<&str>,
    server_flag: Option<SocketAddr>,
) -> Result<(Origin, ResolverConfig, Vec<String>)> {
    let mut notes = Vec::new();
    let nameserver = match &args.nameserver {
        Some(s) => Some(parse_server(s).map_err(|e| anyhow::anyhow!("--nameserver {s:?}: {e}"))?),
        None => server_flag,
    };
    let state: Option<NodeState> = match std::fs::read_to_string(&args.node_state) {
        Ok(text) => Some(serde_json::from_str(&text).with_context(|| {
            format!("the node state {} is not valid", args.node_state.display())
        })?),
        Err(e) if e.kind() == io::ErrorKind::NotFound && nameserver.is_some() => {
            notes.push(format!(
                "no node state at {}: search and ndots are the Kubernetes defaults",
                args.node_state.display()
            ));
            None
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "reading the node state {} (is weft-agent running on this node? --nameserver \
                     asks a server without it)",
                    args.node_state.display()
                )
            })
        }
    };
    let dns = state.map(|s| s.dns).unwrap_or_default();
    let nameserver = match nameserver {
        Some(n) => n,
        None => {
            let first = dns.nameservers.first().with_context(|| {
                format!(
                    "the node state {} lists no nameserver (pass --nameserver)",
                    args.node_state.display()
                )
            })?;
            parse_server(first).map_err(|e| {
                anyhow::anyhow!(
                    "the node state {}: nameserver {first:?}: {e}",
                    args.node_state.display()
                )
            })?
        }
    };
    let zone = match &args.cluster_domain {
        Some(z) => {
            let z = z.trim_end_matches('.');
            parse_name(z).map_err(|e| anyhow::anyhow!("--cluster-domain {z:?}: {e}"))?;
            z.to_string()
        }
        None => zone_from_search(&dns.search).unwrap_or_else(|| "cluster.local".into()),
    };
    let (ndots, edns) = parse_options(&dns.options);

    let origin = match &args.from {
        None => {
            let ns = namespace.unwrap_or(crate::DEFAULT_NAMESPACE);
            let errs = weft_model::validate::dns1123_label_errors(ns);
            if !errs.is_empty() {
                bail!("-n {ns:?} is not a valid namespace: {}", errs.join("; "));
            }
            Origin::Node {
                namespace: ns.to_string(),
            }
        }
        Some(p) => {
            let (ns, name) = parse_pod(p, namespace)?;
            match find_claim(&args.ipam_dir, &ns, &name)? {
                None => bail!(
                    "pod {ns}/{name} is not on this node: no IPAM claim for it in {}. Run netctl \
                     dns on the pod's node, or `-n {ns}` without --from to search like it from \
                     this node (the server then does not walk the search path)",
                    args.ipam_dir.display()
                ),
                Some(PodClaim {
                    ip,
                    netns: Some(netns),
                }) => Origin::Pod {
                    namespace: ns,
                    name,
                    ip,
                    netns,
                },
                Some(PodClaim { ip, netns: None }) => {
                    notes.push(format!(
                        "pod {ns}/{name} ({ip}) has no network namespace in its claim: asking from \
                         the node with its search list (the server then does not walk the search path)"
                    ));
                    Origin::Node { namespace: ns }
                }
            }
        }
    };
    let config = ResolverConfig {
        nameserver,
        search: pod_search(&zone, origin.namespace(), &dns.search),
        ndots,
        edns,
    };
    Ok((origin, config, notes))
}

/// Resolve and report. 0: resolved, 1: not found, 2: an error.
pub fn run(
    args: &DnsArgs,
    namespace: Option<&str>,
    server_flag: Option<SocketAddr>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> ExitCode {
    match resolve(args, namespace, server_flag) {
        Ok(rep) => {
            let text = match args.output.as_deref() {
                Some("json") => serde_json::to_string_pretty(&to_json(&rep))
                    .map(|s| s + "\n")
                    .unwrap_or_default(),
                _ => render(&rep),
            };
            // `| head`: a closed pipe is not the resolution's failure.
            let _ = out.write_all(text.as_bytes());
            ExitCode::from(rep.walk.exit_code())
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            ExitCode::from(2)
        }
    }
}

pub fn resolve(
    args: &DnsArgs,
    namespace: Option<&str>,
    server_flag: Option<SocketAddr>,
) -> Result<Report> {
    let (origin, config, notes) = prepare(args, namespace, server_flag)?;
    let qtype = args.qtype.unwrap_or_else(|| args.name.default_type());
    let cands = candidates(&args.name, &config.search, config.ndots);
    if cands.is_empty() {
        bail!(
            "NAME {:?}: too long to ask with any suffix",
            args.name.to_string()
        );
    }
    let ex = Exchange {
        server: config.nameserver,
        timeout: TIMEOUT,
        tries: TRIES,
        edns: config.edns,
    };
    let walk = match &origin {
        Origin::Pod { netns, .. } => {
            // The sockets are created on this thread after setns: they
            // belong to the pod's namespace and carry its address.
            in_netns(netns, move || walk(cands, qtype, |n, t| ex.ask(n, t)))?
        }
        Origin::Node { .. } => walk(cands, qtype, |n, t| ex.ask(n, t)),
    };
    Ok(Report {
        target: args.name.clone(),
        origin,
        config,
        walk,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME};

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn names(v: &[Name]) -> Vec<String> {
        v.iter().map(|n| n.to_string()).collect()
    }

    fn target(s: &str) -> Target {
        parse_name(s).unwrap()
    }

    fn search(ns: &str) -> Vec<String> {
        pod_search("cluster.local", ns, &[])
    }

    fn a(name: &str, ip: &str) -> Record {
        Record::from_rdata(n(name), 30, RData::A(A(ip.parse().unwrap())))
    }

    fn cname(name: &str, to: &str) -> Record {
        Record::from_rdata(n(name), 30, RData::CNAME(CNAME(n(to))))
    }

    fn reply(rcode: ResponseCode, answers: Vec<Record>) -> Result<Reply, ExchangeError> {
        Ok(Reply {
            rcode,
            answers,
            tcp: false,
        })
    }

    /// The walk for `name` as a pod of `shop`, step N (from 1) answered
    /// with `rcode(N)` and no records.
    fn walk_rcodes(name: &str, qtype: RecordType, rcode: impl Fn(usize) -> ResponseCode) -> Walk {
        let mut n = 0;
        walk(
            candidates(&target(name), &search("shop"), 5),
            qtype,
            |_, _| {
                n += 1;
                reply(rcode(n), vec![])
            },
        )
    }

    #[test]
    fn search_list_of_a_pod() {
        assert_eq!(
            search("shop"),
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        // The node state's own entries after the cluster's, once each.
        let node = [
            "svc.cluster.local".to_string(),
            "cluster.local.".into(),
            "corp.example".into(),
            "other.svc.cluster.local".into(),
            "corp.example".into(),
            "lab.example.".into(),
        ];
        assert_eq!(
            pod_search("cluster.local.", "default", &node),
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "lab.example"
            ]
        );
        assert_eq!(zone_from_search(&node).as_deref(), Some("cluster.local"));
        assert_eq!(
            zone_from_search(&["svc.k8s.test.".into()]).as_deref(),
            Some("k8s.test")
        );
        assert_eq!(zone_from_search(&["corp.example".into()]), None);
        assert_eq!(parse_options(&[]), (5, false));
        assert_eq!(
            parse_options(&["ndots:2".into(), "edns0".into(), "ndots:x".into()]),
            (2, true)
        );
        assert_eq!(parse_options(&["ndots:99".into()]), (15, false));
    }

    #[test]
    fn step_order_follows_ndots() {
        let s = search("shop");
        // Fewer dots than ndots: the search list, then the name.
        assert_eq!(
            names(&candidates(&target("web"), &s, 5)),
            [
                "web.shop.svc.cluster.local.",
                "web.svc.cluster.local.",
                "web.cluster.local.",
                "web."
            ]
        );
        assert_eq!(
            names(&candidates(&target("example.com"), &s, 1)),
            [
                "example.com.",
                "example.com.shop.svc.cluster.local.",
                "example.com.svc.cluster.local.",
                "example.com.cluster.local."
            ]
        );
        assert_eq!(
            names(&candidates(&target("example.com"), &s, 2))[0],
            "example.com.shop.svc.cluster.local."
        );
        // A trailing dot: once, as is.
        assert_eq!(
            names(&candidates(&target("web.shop.svc.cluster.local."), &s, 5)),
            ["web.shop.svc.cluster.local."]
        );
        // An address: its reverse name.
        let t = target("198.19.0.20");
        assert_eq!(t.default_type(), RecordType::PTR);
        assert_eq!(names(&candidates(&t, &s, 5)), ["20.0.19.198.in-addr.arpa."]);
        // A suffix that makes the name too long is skipped.
        // (232 bytes: room for `.svc.cluster.local`, not for `.shop.svc.cluster.local`.)
        let long = ["a", "b", "c"].map(|c| c.repeat(63)).join(".") + "." + &"d".repeat(40);
        let c = candidates(&target(&long), &s, 5);
        assert_eq!(
            names(&c),
            [
                format!("{long}.svc.cluster.local."),
                format!("{long}.cluster.local."),
                format!("{long}.")
            ]
        );
    }

    #[test]
    fn bad_input_names_the_value() {
        assert_eq!(parse_name(""), Err("empty name".into()));
        assert!(parse_name("a..b").unwrap_err().contains("empty label"));
        assert!(parse_name("we b")
            .unwrap_err()
            .contains("invalid character ' ' in label \"we b\""));
        assert!(parse_name(&"x".repeat(64))
            .unwrap_err()
            .contains("64 bytes long (at most 63)"));
        assert!(parse_name("_http._tcp.web").is_ok());
        assert_eq!(parse_type("srv"), Ok(RecordType::SRV));
        assert_eq!(parse_type("TYPE65"), Ok(RecordType::HTTPS));
        assert!(parse_type("BOGUS")
            .unwrap_err()
            .starts_with("unknown record type"));
        assert!(parse_type("axfr").unwrap_err().contains("AXFR"));
        assert_eq!(
            parse_server("198.19.0.10"),
            Ok("198.19.0.10:53".parse().unwrap())
        );
        assert_eq!(
            parse_server("[fd00::a]:5353"),
            Ok("[fd00::a]:5353".parse().unwrap())
        );
        assert!(parse_server("dns.local").is_err());
        assert_eq!(
            parse_pod("shop/client", None).unwrap(),
            ("shop".into(), "client".into())
        );
        assert_eq!(
            parse_pod("client", Some("shop")).unwrap(),
            ("shop".into(), "client".into())
        );
        assert_eq!(
            parse_pod("client", None).unwrap(),
            ("default".into(), "client".into())
        );
        let e = parse_pod("Shop/client", None).unwrap_err().to_string();
        assert!(
            e.starts_with("--from \"Shop/client\": namespace \"Shop\""),
            "{e}"
        );
        let e = parse_pod("shop/client", Some("other"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("-n says \"other\""), "{e}");

        // Through the command line: clap names the argument and the value.
        use clap::Parser as _;
        let e = crate::Cli::try_parse_from(["netctl", "dns", "web", "--type", "BOGUS"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid value 'BOGUS' for '--type <TYPE>'"),
            "{e}"
        );
        let e = crate::Cli::try_parse_from(["netctl", "dns", "a..b"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid value 'a..b' for '<NAME>': empty label"),
            "{e}"
        );
    }

    #[test]
    fn walk_stops_at_the_first_answer() {
        let cands = candidates(&target("web"), &search("shop"), 5);
        let mut asked = Vec::new();
        let w = walk(cands, RecordType::A, |name, _| {
            asked.push(name.to_string());
            if name.to_string() == "web.svc.cluster.local." {
                reply(
                    ResponseCode::NoError,
                    vec![a("web.svc.cluster.local.", "198.19.0.20")],
                )
            } else {
                reply(ResponseCode::NXDomain, vec![])
            }
        });
        assert_eq!(
            asked,
            ["web.shop.svc.cluster.local.", "web.svc.cluster.local."]
        );
        assert_eq!(w.verdict, Verdict::Resolved);
        assert_eq!(w.steps.len(), 2);
        assert_eq!(w.server_walked(), None);
        assert_eq!(w.exit_code(), 0);

        // NXDOMAIN, no data and SERVFAIL walk on; NXDOMAIN everywhere is 1.
        let w = walk_rcodes("nope", RecordType::A, |_| ResponseCode::NXDomain);
        assert_eq!((w.steps.len(), w.exit_code()), (4, 1));
        assert_eq!(w.verdict, Verdict::NotFound);
        let w = walk_rcodes("nope", RecordType::A, |n| {
            if n == 2 {
                ResponseCode::ServFail
            } else {
                ResponseCode::NoError
            }
        });
        assert_eq!(w.steps.len(), 4);
        assert_eq!(
            w.verdict,
            Verdict::Failed("SERVFAIL at step 2 (a temporary failure, not a missing name)".into())
        );
        // REFUSED or no reply stop the walk with 2.
        let w = walk_rcodes("x", RecordType::A, |_| ResponseCode::Refused);
        assert_eq!((w.steps.len(), w.exit_code()), (1, 2));
        let w = walk(
            candidates(&target("x"), &search("shop"), 5),
            RecordType::A,
            |_, _| {
                Err(ExchangeError::Refused {
                    server: "198.19.0.10:53".parse().unwrap(),
                })
            },
        );
        assert_eq!(
            w.verdict,
            Verdict::Failed(
                "step 1: 198.19.0.10:53 refused the query (nothing listening there)".into()
            )
        );
    }

    /// A recorded exchange: the server answered step 1 with a CNAME to step 2's name.
    fn recorded() -> Report {
        let cands = candidates(&target("web.other"), &search("shop"), 5);
        let steps = vec![Step {
            name: cands[0].clone(),
            latency: Duration::from_micros(412),
            result: reply(
                ResponseCode::NoError,
                vec![
                    cname(
                        "web.other.shop.svc.cluster.local.",
                        "web.other.svc.cluster.local.",
                    ),
                    a("web.other.svc.cluster.local.", "198.19.0.21"),
                ],
            ),
        }];
        Report {
            target: target("web.other"),
            origin: Origin::Pod {
                namespace: "shop".into(),
                name: "client".into(),
                ip: "198.18.128.12".into(),
                netns: "/run/netns/cni-1".into(),
            },
            config: ResolverConfig {
                nameserver: "198.19.0.10:53".parse().unwrap(),
                search: search("shop"),
                ndots: 5,
                edns: false,
            },
            walk: Walk {
                qtype: RecordType::A,
                candidates: cands,
                steps,
                verdict: Verdict::Resolved,
            },
            notes: vec![],
        }
    }

    #[test]
    fn renders_a_server_side_walk() {
        let rep = recorded();
        assert_eq!(rep.walk.server_walked(), Some(1));
        assert_eq!(
            render(&rep),
            "\
resolving web.other A as pod shop/client (198.18.128.12), from inside its network namespace
nameserver 198.19.0.10:53   search shop.svc.cluster.local svc.cluster.local cluster.local   ndots 5
web.other has 1 dot (< ndots 5): the search list first, then the name as given

step 1/4  web.other.shop.svc.cluster.local.  A  NOERROR  412µs
    web.other.shop.svc.cluster.local. → web.other.svc.cluster.local.  (CNAME, ttl 30)
    web.other.svc.cluster.local.  A  198.19.0.21  (ttl 30)
    server walked the search path: a CNAME to step 2's name web.other.svc.cluster.local.

resolved at step 1 of 4: web.other.shop.svc.cluster.local. → web.other.svc.cluster.local. → 198.19.0.21
(3 later steps not asked: the resolver stops at the first answer)
"
        );
        let v = to_json(&rep);
        assert_eq!(v["status"], "resolved");
        assert_eq!(v["resolvedAt"], 1);
        assert_eq!(v["from"]["pod"], "shop/client");
        assert_eq!(v["steps"][0]["rcode"], "NOERROR");
        assert_eq!(v["steps"][0]["latencyMicros"], 412);
        assert_eq!(v["steps"][0]["serverWalked"]["step"], 2);
        assert_eq!(v["steps"][0]["answers"][1]["data"], "198.19.0.21");
        assert_eq!(v["candidates"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn renders_a_name_found_nowhere_from_the_node() {
        let cands = candidates(&target("nope"), &search("default"), 5);
        let steps = cands
            .iter()
            .map(|c| Step {
                name: c.clone(),
                latency: Duration::from_micros(200),
                result: reply(ResponseCode::NXDomain, vec![]),
            })
            .collect();
        let rep = Report {
            target: target("nope"),
            origin: Origin::Node {
                namespace: "default".into(),
            },
            config: ResolverConfig {
                nameserver: "198.19.0.10:53".parse().unwrap(),
                search: search("default"),
                ndots: 5,
                edns: false,
            },
            walk: Walk {
                qtype: RecordType::A,
                candidates: cands,
                steps,
                verdict: Verdict::NotFound,
            },
            notes: vec![],
        };
        let text = render(&rep);
        assert!(text.starts_with("resolving nope A from this node, with the search list of a pod of namespace default"), "{text}");
        for (i, c) in [
            "nope.default.svc.cluster.local.",
            "nope.svc.cluster.local.",
            "nope.cluster.local.",
            "nope.",
        ]
        .iter()
        .enumerate()
        {
            assert!(
                text.contains(&format!("step {}/4  {c}  A  NXDOMAIN  200µs\n", i + 1)),
                "{text}"
            );
        }
        assert!(
            text.ends_with("not resolved: NXDOMAIN at every one of the 4 steps\n"),
            "{text}"
        );
        assert_eq!(to_json(&rep)["status"], "notFound");
    }

    #[test]
    fn renders_no_data_and_server_errors() {
        let mut rep = recorded();
        rep.walk = walk_rcodes("web", RecordType::AAAA, |n| {
            if n == 1 {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            }
        });
        let text = render(&rep);
        assert!(
            text.contains("step 1/4  web.shop.svc.cluster.local.  AAAA  NOERROR (no records)  "),
            "{text}"
        );
        assert!(
            text.ends_with("not resolved: no AAAA records at any of the 4 steps (NOERROR without data where the name exists, NXDOMAIN elsewhere)\n"),
            "{text}"
        );
        assert_eq!(rep.walk.exit_code(), 1);
        rep.walk = walk_rcodes("web", RecordType::A, |_| ResponseCode::Refused);
        let text = render(&rep);
        assert!(
            text.ends_with("not resolved: REFUSED at step 1 (the resolver stops there)\n"),
            "{text}"
        );
        assert_eq!(
            to_json(&rep)["reason"],
            "REFUSED at step 1 (the resolver stops there)"
        );
    }

    #[test]
    fn chains_follow_cnames() {
        let answers = [
            cname("ext.shop.svc.cluster.local.", "example.test."),
            a("example.test.", "198.19.255.1"),
            a("example.test.", "198.19.255.2"),
        ];
        assert_eq!(
            answer_chain(&n("ext.shop.svc.cluster.local."), &answers),
            "ext.shop.svc.cluster.local. → example.test. → 198.19.255.1, 198.19.255.2"
        );
        // A CNAME loop ends.
        let answers = [cname("a.test.", "b.test."), cname("b.test.", "a.test.")];
        assert!(answer_chain(&n("a.test."), &answers).starts_with("a.test. → b.test. → a.test."));
    }

    /// A server on loopback: UDP answers with TC set, TCP with the records.
    #[test]
    fn retries_over_tcp_when_truncated() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = std::net::TcpListener::bind(addr).unwrap();
        let answer = |req: &Message, tc: bool| {
            let mut m = Message::response(req.metadata.id, req.metadata.op_code);
            m.queries = req.queries.clone();
            m.metadata.truncation = tc;
            if !tc {
                m.answers = (1..=3)
                    .map(|i| a("big.test.", &format!("198.19.255.{i}")))
                    .collect();
            }
            m.to_vec().unwrap()
        };
        let u = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (len, from) = udp.recv_from(&mut buf).unwrap();
            let req = Message::from_vec(&buf[..len]).unwrap();
            // Strays first, ignored: a runt, and complete answers that
            // would end the exchange over UDP if taken (another id,
            // another question).
            udp.send_to(&answer(&req, false)[..5], from).unwrap();
            let mut other_id = Message::from_vec(&answer(&req, false)).unwrap();
            other_id.metadata.id = req.metadata.id.wrapping_add(1);
            udp.send_to(&other_id.to_vec().unwrap(), from).unwrap();
            let mut other_name = Message::from_vec(&answer(&req, false)).unwrap();
            other_name.queries = vec![Query::query(n("other.test."), RecordType::A)];
            udp.send_to(&other_name.to_vec().unwrap(), from).unwrap();
            udp.send_to(&answer(&req, true), from).unwrap();
        });
        let t = std::thread::spawn(move || {
            let (mut s, _) = tcp.accept().unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut raw = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut raw).unwrap();
            let out = answer(&Message::from_vec(&raw).unwrap(), false);
            s.write_all(&(out.len() as u16).to_be_bytes()).unwrap();
            s.write_all(&out).unwrap();
        });
        let ex = Exchange {
            server: addr,
            timeout: Duration::from_secs(5),
            tries: 1,
            edns: false,
        };
        let r = ex.ask(&n("big.test."), RecordType::A).unwrap();
        assert!(r.tcp);
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 3);
        u.join().unwrap();
        t.join().unwrap();
    }

    #[test]
    fn silence_and_closed_ports_are_errors() {
        let quiet = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ex = Exchange {
            server: quiet.local_addr().unwrap(),
            timeout: Duration::from_millis(50),
            tries: 2,
            edns: true,
        };
        let e = ex.ask(&n("web.test."), RecordType::A).unwrap_err();
        assert!(matches!(e, ExchangeError::Timeout { tries: 2, .. }), "{e}");
        assert!(e.to_string().contains("after 2 tries of 0.05s"), "{e}");
        // The datagram arrived twice, with EDNS.
        let mut buf = [0u8; 512];
        quiet
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let n1 = quiet.recv(&mut buf).unwrap();
        assert!(Message::from_vec(&buf[..n1]).unwrap().edns.is_some());
        quiet.recv(&mut buf).unwrap();
        let closed = quiet.local_addr().unwrap();
        drop(quiet);
        let ex = Exchange {
            server: closed,
            ..ex
        };
        let e = ex.ask(&n("web.test."), RecordType::A).unwrap_err();
        assert!(matches!(e, ExchangeError::Refused { .. }), "{e}");
    }

    #[test]
    fn finds_pods_by_claim_and_reads_the_node_state() {
        let dir = std::env::temp_dir().join(format!("netctl-dns-{}", std::process::id()));
        let ipam = dir.join("ipam");
        std::fs::create_dir_all(&ipam).unwrap();
        std::fs::write(
            ipam.join("198.18.128.12"),
            "cid1\neth0\nnetns=/run/netns/p1\npodNamespace=shop\npodName=client\n",
        )
        .unwrap();
        std::fs::write(
            ipam.join("198.18.128.13"),
            "cid2\neth0\npodNamespace=shop\npodName=bare\n",
        )
        .unwrap();
        // The same pod's second interface, at a lower address: not chosen.
        std::fs::write(
            ipam.join("198.18.128.11"),
            "cid1\nnet1\nnetns=/run/netns/p1\npodNamespace=shop\npodName=client\n",
        )
        .unwrap();
        std::fs::write(ipam.join("lock"), "").unwrap();
        assert_eq!(
            find_claim(&ipam, "shop", "client").unwrap(),
            Some(PodClaim {
                ip: "198.18.128.12".into(),
                netns: Some("/run/netns/p1".into())
            })
        );
        assert_eq!(find_claim(&ipam, "other", "client").unwrap(), None);
        assert_eq!(
            find_claim(&dir.join("missing"), "shop", "client").unwrap(),
            None
        );

        let state = dir.join("node.json");
        std::fs::write(
            &state,
            r#"{"subnet":"198.18.128.0/24","gateway":"198.18.128.1","mtu":1450,"bridge":"weft0",
               "dns":{"nameservers":["198.19.0.10"],"search":["svc.k8s.test","k8s.test","corp.example"],
                      "options":["ndots:3"]}}"#,
        )
        .unwrap();
        use clap::Parser as _;
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "netctl",
                "dns",
                "web",
                "--node-state",
                state.to_str().unwrap(),
                "--ipam-dir",
                ipam.to_str().unwrap(),
            ];
            argv.extend_from_slice(extra);
            let crate::Command::Dns(args) = crate::Cli::try_parse_from(argv).unwrap().command
            else {
                panic!("not dns")
            };
            args
        };
        let (origin, cfg, notes) = prepare(&parse(&[]), None, None).unwrap();
        assert_eq!(
            origin,
            Origin::Node {
                namespace: "default".into()
            }
        );
        assert_eq!(cfg.nameserver, "198.19.0.10:53".parse().unwrap());
        assert_eq!(
            cfg.search,
            [
                "default.svc.k8s.test",
                "svc.k8s.test",
                "k8s.test",
                "corp.example"
            ]
        );
        assert_eq!(cfg.ndots, 3);
        assert!(notes.is_empty());
        // --nameserver wins over the node state; so does `--server ADDR`.
        let (_, cfg, _) = prepare(&parse(&["--nameserver", "127.0.0.1:5353"]), None, None).unwrap();
        assert_eq!(cfg.nameserver, "127.0.0.1:5353".parse().unwrap());
        let (_, cfg, _) =
            prepare(&parse(&[]), None, Some("127.0.0.2:53".parse().unwrap())).unwrap();
        assert_eq!(cfg.nameserver, "127.0.0.2:53".parse().unwrap());
        let (origin, cfg, _) = prepare(&parse(&["--from", "shop/client"]), None, None).unwrap();
        assert!(matches!(origin, Origin::Pod { ref ip, .. } if ip == "198.18.128.12"));
        assert_eq!(cfg.search[0], "shop.svc.k8s.test");
        // A pod without a netns in its claim: from the node, said so.
        let (origin, _, notes) = prepare(&parse(&["--from", "bare"]), Some("shop"), None).unwrap();
        assert_eq!(
            origin,
            Origin::Node {
                namespace: "shop".into()
            }
        );
        assert!(
            notes[0].contains("does not walk the search path"),
            "{notes:?}"
        );
        // A pod that is not here: an error naming it.
        let e = prepare(&parse(&["--from", "shop/ghost"]), None, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("pod shop/ghost is not on this node"),
            "{e}"
        );
        let e = prepare(&parse(&["--nameserver", "dns"]), None, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--nameserver \"dns\": expected IP"),
            "{e}"
        );
        // No node state: needs a nameserver.
        std::fs::remove_file(&state).unwrap();
        let e = format!("{:#}", prepare(&parse(&[]), None, None).unwrap_err());
        assert!(e.contains("reading the node state"), "{e}");
        let (_, cfg, notes) = prepare(&parse(&["--nameserver", "127.0.0.1"]), None, None).unwrap();
        assert_eq!(cfg.search[2], "cluster.local");
        assert_eq!(cfg.ndots, 5);
        assert!(notes[0].starts_with("no node state"), "{notes:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
