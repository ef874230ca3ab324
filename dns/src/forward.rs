//! The upstream forwarder and its cache: every name the cluster zone does not
//! answer goes to the node's upstream resolvers from here.
//!
//! Owns the upstream exchange (fresh random id and a fresh kernel-chosen
//! source port per query, answers checked against id, question and source
//! address, TCP retry on truncation, fail-over between upstreams), the cache
//! (positive answers by the smallest answer TTL, negative answers per RFC 2308,
//! serve-stale per RFC 8767, bounded size) and the coalescing of identical
//! in-flight queries into one upstream query.
//!
//! Locks are plain `std` mutexes held for a map operation only, never across
//! an `.await`: a query never waits on another query's network exchange,
//! except a coalesced one that is waiting for exactly that answer.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::DecodeError;
use hickory_proto::ProtoError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::debug;

/// The EDNS payload size advertised upstream (DNS flag day 2020: fits an
/// unfragmented datagram on any path).
pub const UPSTREAM_EDNS_PAYLOAD: u16 = 1232;

/// Evictions look at this many random entries and drop the one whose
/// freshness ended first (expired entries go first); a cache this small or
/// smaller is scanned whole.
const EVICTION_SAMPLES: usize = 8;

/// How the forwarder talks to upstreams and caches their answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Upstream resolvers, tried in rotation, failing over to the next.
    pub upstreams: Vec<SocketAddr>,
    /// Time allowed for one exchange with one upstream.
    pub timeout: Duration,
    /// Rounds over the whole upstream list before giving up.
    pub attempts: u32,
    /// At most this many cached answers; 0 disables the cache.
    pub cache_entries: usize,
    /// Upper bound on any TTL cached and handed out.
    pub max_ttl: u32,
    /// Lower bound on positive answers' TTLs.
    pub min_ttl: u32,
    /// Upper bound on the TTL of a cached NXDOMAIN/NODATA (RFC 2308).
    pub negative_ttl_max: u32,
    /// How long an expired entry is kept to answer when every upstream
    /// fails (RFC 8767).
    pub serve_stale_for: Duration,
    /// The TTL of a stale answer (RFC 8767 recommends 30 s).
    pub stale_ttl: u32,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            cache_entries: 10_000,
            max_ttl: 3600,
            min_ttl: 0,
            negative_ttl_max: 300,
            serve_stale_for: Duration::from_secs(3600),
            stale_ttl: 30,
        }
    }
}

/// Counters since the forwarder was created (`entries` is the current
/// cache size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Requests handed to [`Forwarder::forward`].
    pub queries: u64,
    /// Requests answered from a fresh cache entry.
    pub cache_hits: u64,
    /// Requests that joined an identical query already in flight.
    pub coalesced: u64,
    /// Failed exchanges with one upstream (timeout, network error, unusable
    /// answer such as SERVFAIL or REFUSED); one request can count several.
    pub upstream_failures: u64,
    /// Requests answered from an expired entry because every upstream failed.
    pub stale_served: u64,
    /// Entries in the cache now.
    pub entries: u64,
}

/// One failed exchange with an upstream; logged, then the next upstream is
/// tried.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{op} {upstream}")]
    Io {
        upstream: SocketAddr,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no answer from {upstream} within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        timeout: Duration,
    },
    #[error("encoding the upstream query for {name}")]
    Encode {
        name: Box<Name>,
        #[source]
        source: ProtoError,
    },
    #[error("undecodable TCP answer from {upstream}")]
    Decode {
        upstream: SocketAddr,
        #[source]
        source: DecodeError,
    },
    #[error("TCP answer from {upstream} does not match the query")]
    Mismatch { upstream: SocketAddr },
    #[error("TCP answer from {upstream} is truncated")]
    Truncated { upstream: SocketAddr },
    #[error("{upstream} answered {rcode}")]
    Rcode {
        upstream: SocketAddr,
        rcode: ResponseCode,
    },
}

/// Forwards queries upstream through a cache. `Send + Sync`: share it behind
/// an `Arc` between the server's tasks.
pub struct Forwarder {
    cfg: ForwardConfig,
    cache: Mutex<Cache>,
    inflight: Mutex<HashMap<CacheKey, broadcast::Sender<Outcome>>>,
    next_upstream: AtomicUsize,
    counters: Counters,
    /// Tests move the cache's clock forward instead of sleeping.
    #[cfg(test)]
    clock_skew_ms: AtomicU64,
}

#[derive(Default)]
struct Counters {
    queries: AtomicU64,
    cache_hits: AtomicU64,
    coalesced: AtomicU64,
    upstream_failures: AtomicU64,
    stale_served: AtomicU64,
}

/// Cache key: the question and the two request bits that change what an
/// upstream returns (DNSSEC records with DO, unvalidated data with CD).
/// `Name`'s `Eq` and `Hash` ignore ASCII case, so differently cased
/// questions share an entry without lowercasing the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    name: Name,
    record_type: RecordType,
    class: DNSClass,
    dnssec_ok: bool,
    checking_disabled: bool,
}

impl CacheKey {
    fn new(query: &Query, dnssec_ok: bool, checking_disabled: bool) -> Self {
        Self {
            name: query.name.clone(),
            record_type: query.query_type,
            class: query.query_class,
            dnssec_ok,
            checking_disabled,
        }
    }
}

/// An upstream answer as cached: sections without the upstream's OPT, TTLs
/// already clamped, and when it was received.
#[derive(Debug)]
struct Cached {
    rcode: ResponseCode,
    authentic_data: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    stored: Instant,
    /// Seconds the answer stays fresh; 0: not cacheable.
    ttl: u32,
}

impl Cached {
    fn from_upstream(msg: Message, cfg: &ForwardConfig, now: Instant) -> Self {
        let rcode = msg.metadata.response_code;
        let authentic_data = msg.metadata.authentic_data;
        let (mut answers, mut authorities, mut additionals) =
            (msg.answers, msg.authorities, msg.additionals);
        let max_ttl = cfg.max_ttl;
        let min_ttl = cfg.min_ttl.min(max_ttl);
        // The entry's TTL and the bounds every record's TTL is clamped to.
        let (ttl, floor, cap) = match rcode {
            ResponseCode::NoError if !answers.is_empty() => {
                let shortest = answers.iter().map(|r| r.ttl).min().unwrap_or(0);
                (shortest.clamp(min_ttl, max_ttl), min_ttl, max_ttl)
            }
            // NXDOMAIN or NODATA: RFC 2308 §5, the lesser of the SOA's TTL
            // and its MINIMUM; without an SOA, not cached.
            ResponseCode::NoError | ResponseCode::NXDomain => {
                let negative = authorities
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                        _ => None,
                    })
                    .min()
                    .map(|t| t.min(cfg.negative_ttl_max).min(max_ttl));
                (negative.unwrap_or(0), 0, negative.unwrap_or(max_ttl))
            }
            // Not cached, and passed on as received.
            _ => (0, 0, u32::MAX),
        };
        for r in answers
            .iter_mut()
            .chain(&mut authorities)
            .chain(&mut additionals)
        {
            r.ttl = r.ttl.clamp(floor, cap);
        }
        Self {
            rcode,
            authentic_data,
            answers,
            authorities,
            additionals,
            stored: now,
            ttl,
        }
    }

    fn fresh_until(&self) -> Instant {
        self.stored + Duration::from_secs(self.ttl.into())
    }
}

/// What a query in flight ends with; shared with every coalesced waiter.
#[derive(Debug, Clone)]
enum Outcome {
    Answer(Arc<Cached>),
    Failed,
}

/// How the TTLs of a cached answer are rewritten for a client.
#[derive(Clone, Copy)]
enum Ttls {
    /// Minus the seconds since the answer was received.
    Elapsed(u32),
    /// All set to the stale TTL (RFC 8767).
    Stale(u32),
}

/// A cache entry that may answer: `(entry, stale)`, see [`Cache::lookup`].
type Hit = (Arc<Cached>, bool);

enum Role<'a> {
    Cached(Hit),
    Follower(broadcast::Receiver<Outcome>),
    Leader(Leader<'a>),
}

/// The one query of a key that goes upstream. If it is dropped before it
/// finishes (its client went away), it leaves the in-flight map, the waiters
/// see the channel close and one of them takes over.
struct Leader<'a> {
    inflight: &'a Mutex<HashMap<CacheKey, broadcast::Sender<Outcome>>>,
    key: &'a CacheKey,
    finished: bool,
}

impl Leader<'_> {
    fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        let sender = lock(self.inflight).remove(self.key);
        if let Some(sender) = sender {
            // No receivers is fine: nobody else asked.
            let _ = sender.send(outcome);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.finished {
            lock(self.inflight).remove(self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent at every unlock, so a poisoned lock is usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Forwarder {
    pub fn new(cfg: ForwardConfig) -> Forwarder {
        Forwarder {
            cache: Mutex::new(Cache::new(cfg.cache_entries, cfg.serve_stale_for)),
            cfg,
            inflight: Mutex::new(HashMap::new()),
            next_upstream: AtomicUsize::new(0),
            counters: Counters::default(),
            #[cfg(test)]
            clock_skew_ms: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &ForwardConfig {
        &self.cfg
    }

    pub fn stats(&self) -> ForwardStats {
        let c = &self.counters;
        ForwardStats {
            queries: c.queries.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failures.load(Ordering::Relaxed),
            stale_served: c.stale_served.load(Ordering::Relaxed),
            entries: lock(&self.cache).len() as u64,
        }
    }

    /// Answers a client's request (one question; the caller checked) from
    /// the cache or upstream. The response carries the client's id and
    /// question, RD copied, RA set, the upstream's sections and rcode and no
    /// OPT record (the caller adds its own EDNS). When every upstream fails:
    /// a stale answer if one is kept, else SERVFAIL.
    pub async fn forward(&self, request: &Message) -> Message {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let Some(query) = request.queries.first() else {
            return empty_response(request, ResponseCode::FormErr);
        };
        if request.metadata.op_code != OpCode::Query {
            return empty_response(request, ResponseCode::NotImp);
        }
        let key = CacheKey::new(
            query,
            dnssec_ok(request),
            request.metadata.checking_disabled,
        );
        loop {
            let now = self.now();
            let hit = lock(&self.cache).lookup(&key, now);
            if let Some(hit) = hit {
                return self.answer_from_cache(request, hit, now);
            }
            let role = {
                let mut inflight = lock(&self.inflight);
                if let Some(sender) = inflight.get(&key) {
                    Role::Follower(sender.subscribe())
                } else {
                    // Filled between the first look and taking the lock?
                    let hit = lock(&self.cache).lookup(&key, now);
                    match hit {
                        Some(hit) => Role::Cached(hit),
                        None => {
                            let (sender, _) = broadcast::channel(1);
                            inflight.insert(key.clone(), sender);
                            Role::Leader(Leader {
                                inflight: &self.inflight,
                                key: &key,
                                finished: false,
                            })
                        }
                    }
                }
            };
            let outcome = match role {
                Role::Cached(hit) => return self.answer_from_cache(request, hit, now),
                Role::Follower(mut receiver) => {
                    self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                    match receiver.recv().await {
                        Ok(outcome) => outcome,
                        // The leader was dropped before answering: look again.
                        Err(_) => continue,
                    }
                }
                Role::Leader(leader) => {
                    let outcome = self.resolve(&key, query).await;
                    leader.finish(outcome.clone());
                    outcome
                }
            };
            return self.respond_outcome(request, &key, outcome);
        }
    }

    /// The response from a fresh cache entry, or from a stale one while the
    /// key is in its failure hold-down (RFC 8767's failure recheck timer,
    /// here `stale_ttl`): during an outage a client gets the stale answer at
    /// once instead of after every upstream timed out again. Built outside
    /// the locks.
    fn answer_from_cache(&self, request: &Message, (entry, stale): Hit, now: Instant) -> Message {
        if stale {
            return self.serve_stale(request, &entry);
        }
        self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        respond(request, &entry, Ttls::Elapsed(elapsed_secs(&entry, now)))
    }

    fn serve_stale(&self, request: &Message, entry: &Cached) -> Message {
        self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
        respond(request, entry, Ttls::Stale(self.cfg.stale_ttl))
    }

    fn respond_outcome(&self, request: &Message, key: &CacheKey, outcome: Outcome) -> Message {
        let now = self.now();
        match outcome {
            Outcome::Answer(answer) => {
                respond(request, &answer, Ttls::Elapsed(elapsed_secs(&answer, now)))
            }
            Outcome::Failed => {
                let hold = Duration::from_secs(self.cfg.stale_ttl.into());
                let stale = lock(&self.cache).stale(key, now, hold);
                match stale {
                    Some(stale) => self.serve_stale(request, &stale),
                    None => empty_response(request, ResponseCode::ServFail),
                }
            }
        }
    }

    /// The leader's upstream query; caches what is cacheable.
    async fn resolve(&self, key: &CacheKey, query: &Query) -> Outcome {
        let Some(response) = self.ask_upstreams(key, query).await else {
            return Outcome::Failed;
        };
        let now = self.now();
        let answer = Arc::new(Cached::from_upstream(response, &self.cfg, now));
        if answer.ttl > 0 {
            lock(&self.cache).insert(key.clone(), answer.clone());
        }
        Outcome::Answer(answer)
    }

    async fn ask_upstreams(&self, key: &CacheKey, query: &Query) -> Option<Message> {
        let upstreams = &self.cfg.upstreams;
        if upstreams.is_empty() {
            return None;
        }
        // Encoded once; every exchange sends it under its own random id.
        let wire = match upstream_query(query, key.dnssec_ok, key.checking_disabled) {
            Ok(wire) => wire,
            Err(err) => {
                debug!(name = %query.name, qtype = %query.query_type, error = %err,
                    "cannot forward");
                return None;
            }
        };
        // Rotate the first upstream tried to spread the load.
        let start = self.next_upstream.fetch_add(1, Ordering::Relaxed) % upstreams.len();
        for _round in 0..self.cfg.attempts.max(1) {
            for upstream in upstreams[start..].iter().chain(&upstreams[..start]) {
                match self.exchange(*upstream, query, &wire).await {
                    Ok(response) => return Some(response),
                    Err(err) => {
                        self.counters
                            .upstream_failures
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(%upstream, name = %query.name, qtype = %query.query_type,
                            error = %err, "upstream exchange failed");
                    }
                }
            }
        }
        None
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        query: &Query,
        wire: &[u8],
    ) -> Result<Message, ForwardError> {
        let mut response = self
            .within(upstream, exchange_udp(upstream, query, wire))
            .await?;
        if response.metadata.truncation {
            response = self
                .within(upstream, exchange_tcp(upstream, query, wire))
                .await?;
            if response.metadata.truncation {
                return Err(ForwardError::Truncated { upstream });
            }
        }
        match response.metadata.response_code {
            rcode @ (ResponseCode::ServFail
            | ResponseCode::Refused
            | ResponseCode::NotImp
            | ResponseCode::FormErr) => Err(ForwardError::Rcode { upstream, rcode }),
            _ => Ok(response),
        }
    }

    /// `exchange` bounded by the configured timeout.
    async fn within(
        &self,
        upstream: SocketAddr,
        exchange: impl Future<Output = Result<Message, ForwardError>>,
    ) -> Result<Message, ForwardError> {
        let timeout = self.cfg.timeout;
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(ForwardError::Timeout { upstream, timeout }))
    }

    fn now(&self) -> Instant {
        let now = Instant::now();
        #[cfg(test)]
        let now = now + Duration::from_millis(self.clock_skew_ms.load(Ordering::Relaxed));
        now
    }

    #[cfg(test)]
    fn advance_clock(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap();
        self.clock_skew_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

fn dnssec_ok(request: &Message) -> bool {
    request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok)
}

fn elapsed_secs(answer: &Cached, now: Instant) -> u32 {
    let secs = now.saturating_duration_since(answer.stored).as_secs();
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// The query sent upstream, id 0 (see [`with_random_id`]): the client's
/// question, RD, the client's CD and DO, EDNS payload 1232, AD set to ask for
/// the AD bit back (RFC 6840 §5.7).
fn upstream_query(query: &Query, dnssec_ok: bool, cd: bool) -> Result<Vec<u8>, ForwardError> {
    let mut msg = Message::new(0, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.metadata.checking_disabled = cd;
    msg.metadata.authentic_data = true;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_EDNS_PAYLOAD);
    edns.set_dnssec_ok(dnssec_ok);
    msg.set_edns(edns);
    msg.to_vec().map_err(|source| ForwardError::Encode {
        name: Box::new(query.name.clone()),
        source,
    })
}

/// The encoded query under a fresh random id (the header's first two bytes).
fn with_random_id(wire: &[u8]) -> (u16, Vec<u8>) {
    let id: u16 = rand::random();
    let mut bytes = wire.to_vec();
    bytes[..2].copy_from_slice(&id.to_be_bytes());
    (id, bytes)
}

/// One UDP exchange from a fresh socket: the kernel picks a random source
/// port, so an off-path spoofer has to guess port and id.
async fn exchange_udp(
    upstream: SocketAddr,
    query: &Query,
    wire: &[u8],
) -> Result<Message, ForwardError> {
    let io_err = |op: &'static str| {
        move |source: io::Error| ForwardError::Io {
            upstream,
            op,
            source,
        }
    };
    let (id, bytes) = with_random_id(wire);
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(io_err("binding a UDP socket for"))?;
    // Connected: the kernel drops datagrams from other sources and an ICMP
    // unreachable fails the exchange at once instead of timing out.
    socket
        .connect(upstream)
        .await
        .map_err(io_err("connecting to"))?;
    socket.send(&bytes).await.map_err(io_err("sending to"))?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let len = socket
            .recv(&mut buf)
            .await
            .map_err(io_err("receiving from"))?;
        match Message::from_vec(&buf[..len]) {
            Ok(msg) if answers(&msg, id, query) => return Ok(msg),
            Ok(msg) => debug!(%upstream, id = msg.metadata.id, expected = id,
                "ignoring an answer that does not match the query"),
            Err(err) => debug!(%upstream, error = %err, "ignoring an undecodable datagram"),
        }
    }
}

/// One TCP exchange (RFC 1035 §4.2.2 framing), after a truncated UDP answer.
async fn exchange_tcp(
    upstream: SocketAddr,
    query: &Query,
    wire: &[u8],
) -> Result<Message, ForwardError> {
    let (id, bytes) = with_random_id(wire);
    // A query is one question and an OPT: always far below 64 KiB.
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&bytes);
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut body).await?;
        Ok::<_, io::Error>(body)
    };
    let body = exchange.await.map_err(|source| ForwardError::Io {
        upstream,
        op: "TCP exchange with",
        source,
    })?;
    let msg =
        Message::from_vec(&body).map_err(|source| ForwardError::Decode { upstream, source })?;
    if !answers(&msg, id, query) {
        return Err(ForwardError::Mismatch { upstream });
    }
    Ok(msg)
}

/// Whether `msg` is the answer to our query `id` for `query` (name compared
/// case-insensitively).
fn answers(msg: &Message, id: u16, query: &Query) -> bool {
    msg.metadata.id == id
        && msg.metadata.message_type == MessageType::Response
        && matches!(msg.queries.as_slice(), [q] if q.name == query.name
            && q.query_type == query.query_type
            && q.query_class == query.query_class)
}

/// The response skeleton for a client: its id, opcode and question, RD and
/// CD copied, RA set, no records.
fn empty_response(request: &Message, rcode: ResponseCode) -> Message {
    let mut resp = Message::response(request.metadata.id, request.metadata.op_code);
    resp.metadata.recursion_desired = request.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = request.metadata.checking_disabled;
    resp.metadata.response_code = rcode;
    resp.queries = request.queries.clone();
    resp
}

fn respond(request: &Message, answer: &Cached, ttls: Ttls) -> Message {
    let mut resp = empty_response(request, answer.rcode);
    // AD only for clients that show they understand it (RFC 6840 §5.8).
    resp.metadata.authentic_data =
        answer.authentic_data && (dnssec_ok(request) || request.metadata.authentic_data);
    let adjust = |r: &Record| {
        let mut r = r.clone();
        r.ttl = match ttls {
            Ttls::Elapsed(secs) => r.ttl.saturating_sub(secs),
            Ttls::Stale(ttl) => ttl,
        };
        r
    };
    resp.answers = answer.answers.iter().map(adjust).collect();
    resp.authorities = answer.authorities.iter().map(adjust).collect();
    resp.additionals = answer.additionals.iter().map(adjust).collect();
    resp
}

/// The bounded answer cache. Entries live until their freshness ends plus
/// the serve-stale window; `keys` mirrors the map so that eviction can pick
/// random entries in O(1).
struct Cache {
    capacity: usize,
    serve_stale_for: Duration,
    map: HashMap<CacheKey, Slot>,
    keys: Vec<CacheKey>,
}

struct Slot {
    entry: Arc<Cached>,
    /// Position of the key in `Cache::keys`.
    index: usize,
    /// After a failed refresh, serve the stale entry without asking
    /// upstream until then.
    recheck_after: Option<Instant>,
}

impl Cache {
    fn new(capacity: usize, serve_stale_for: Duration) -> Self {
        Self {
            capacity,
            serve_stale_for,
            map: HashMap::new(),
            keys: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// A fresh entry `(entry, false)`, or a stale one in its failure
    /// hold-down `(entry, true)`. An entry past its serve-stale window is
    /// removed.
    fn lookup(&mut self, key: &CacheKey, now: Instant) -> Option<Hit> {
        let slot = self.map.get(key)?;
        let fresh_until = slot.entry.fresh_until();
        if now < fresh_until {
            return Some((slot.entry.clone(), false));
        }
        if now >= fresh_until + self.serve_stale_for {
            self.remove(key);
            return None;
        }
        match slot.recheck_after {
            Some(until) if now < until => Some((slot.entry.clone(), true)),
            _ => None,
        }
    }

    /// An entry within its serve-stale window (fresh ones included), for a
    /// refresh that just failed; the key is not refreshed again for `hold`.
    fn stale(&mut self, key: &CacheKey, now: Instant, hold: Duration) -> Option<Arc<Cached>> {
        let slot = self.map.get_mut(key)?;
        if now < slot.entry.fresh_until() + self.serve_stale_for {
            slot.recheck_after = Some(now + hold);
            return Some(slot.entry.clone());
        }
        self.remove(key);
        None
    }

    fn insert(&mut self, key: CacheKey, entry: Arc<Cached>) {
        if self.capacity == 0 {
            return;
        }
        if let Some(slot) = self.map.get_mut(&key) {
            slot.entry = entry;
            slot.recheck_after = None;
            return;
        }
        while self.map.len() >= self.capacity {
            if !self.evict_one() {
                break;
            }
        }
        let index = self.keys.len();
        self.keys.push(key.clone());
        self.map.insert(
            key,
            Slot {
                entry,
                index,
                recheck_after: None,
            },
        );
    }

    /// Drops the entry whose freshness ended first among a few random ones
    /// (all of them in a small cache): expired entries go before live ones.
    fn evict_one(&mut self) -> bool {
        let n = self.keys.len();
        let fresh_until = |i: usize| {
            let slot = self.keys.get(i).and_then(|k| self.map.get(k))?;
            Some(slot.entry.fresh_until())
        };
        let victim = (0..n.min(EVICTION_SAMPLES))
            .map(|j| {
                if n <= EVICTION_SAMPLES {
                    j
                } else {
                    rand::random_range(0..n)
                }
            })
            .min_by_key(|&i| fresh_until(i));
        match victim {
            Some(index) => {
                self.remove_at(index);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(index) = self.map.get(key).map(|slot| slot.index) {
            self.remove_at(index);
        }
    }

    /// Removes the entry of `keys[index]`; the last key takes its place.
    fn remove_at(&mut self, index: usize) {
        if index >= self.keys.len() {
            return;
        }
        let key = self.keys.swap_remove(index);
        self.map.remove(&key);
        if let Some(moved) = self.keys.get(index) {
            if let Some(slot) = self.map.get_mut(moved) {
                slot.index = index;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use std::net::IpAddr;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;
    use tokio::task::JoinHandle;

    // ---- fake upstream servers (loopback only) ----

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Transport {
        Udp,
        Tcp,
    }

    enum Reply {
        Msg(Message),
        Bytes(Vec<u8>),
        /// Sent from a different socket (another source port).
        FromElsewhere(Message),
        /// Hold the following replies until notified.
        Wait(Arc<Notify>),
    }

    type Responder = Arc<dyn Fn(&Message, Transport) -> Vec<Reply> + Send + Sync>;

    struct FakeUpstream {
        addr: SocketAddr,
        udp_queries: Arc<AtomicUsize>,
        tcp_queries: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Message>>>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl FakeUpstream {
        async fn start(
            responder: impl Fn(&Message, Transport) -> Vec<Reply> + Send + Sync + 'static,
        ) -> Self {
            let responder: Responder = Arc::new(responder);
            // UDP and TCP on the same port.
            let (udp, tcp) = loop {
                let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                    break (Arc::new(udp), tcp);
                }
            };
            let addr = udp.local_addr().unwrap();
            let udp_queries = Arc::new(AtomicUsize::new(0));
            let tcp_queries = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let udp_task = {
                let (responder, count, seen) =
                    (responder.clone(), udp_queries.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65535];
                    loop {
                        let Ok((len, peer)) = udp.recv_from(&mut buf).await else {
                            continue;
                        };
                        let Ok(query) = Message::from_vec(&buf[..len]) else {
                            continue;
                        };
                        count.fetch_add(1, Ordering::SeqCst);
                        seen.lock().unwrap().push(query.clone());
                        let replies = responder(&query, Transport::Udp);
                        let udp = udp.clone();
                        tokio::spawn(async move {
                            for reply in replies {
                                let bytes = match reply {
                                    Reply::Wait(n) => {
                                        n.notified().await;
                                        continue;
                                    }
                                    Reply::FromElsewhere(m) => {
                                        let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                                        let _ = other.send_to(&m.to_vec().unwrap(), peer).await;
                                        continue;
                                    }
                                    Reply::Msg(m) => m.to_vec().unwrap(),
                                    Reply::Bytes(b) => b,
                                };
                                let _ = udp.send_to(&bytes, peer).await;
                            }
                        });
                    }
                })
            };
            let tcp_task = {
                let (responder, count, seen) =
                    (responder.clone(), tcp_queries.clone(), seen.clone());
                tokio::spawn(async move {
                    loop {
                        let Ok((mut stream, _)) = tcp.accept().await else {
                            continue;
                        };
                        let (responder, count, seen) =
                            (responder.clone(), count.clone(), seen.clone());
                        tokio::spawn(async move {
                            let mut len = [0u8; 2];
                            if stream.read_exact(&mut len).await.is_err() {
                                return;
                            }
                            let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                            if stream.read_exact(&mut body).await.is_err() {
                                return;
                            }
                            let Ok(query) = Message::from_vec(&body) else {
                                return;
                            };
                            count.fetch_add(1, Ordering::SeqCst);
                            seen.lock().unwrap().push(query.clone());
                            for reply in responder(&query, Transport::Tcp) {
                                let bytes = match reply {
                                    Reply::Msg(m) | Reply::FromElsewhere(m) => m.to_vec().unwrap(),
                                    Reply::Bytes(b) => b,
                                    Reply::Wait(n) => {
                                        n.notified().await;
                                        continue;
                                    }
                                };
                                let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
                                let _ = stream.write_all(&len).await;
                                let _ = stream.write_all(&bytes).await;
                            }
                        });
                    }
                })
            };
            Self {
                addr,
                udp_queries,
                tcp_queries,
                seen,
                tasks: vec![udp_task, tcp_task],
            }
        }

        fn udp(&self) -> usize {
            self.udp_queries.load(Ordering::SeqCst)
        }

        fn tcp(&self) -> usize {
            self.tcp_queries.load(Ordering::SeqCst)
        }

        fn seen(&self) -> Vec<Message> {
            self.seen.lock().unwrap().clone()
        }

        /// Closes the port: later queries are refused or time out.
        async fn stop(&mut self) {
            for t in self.tasks.drain(..) {
                t.abort();
                let _ = t.await;
            }
        }
    }

    impl Drop for FakeUpstream {
        fn drop(&mut self) {
            for t in &self.tasks {
                t.abort();
            }
        }
    }

    // ---- message helpers ----

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 255, last)
    }

    fn request(id: u16, qname: &str, qtype: RecordType, dnssec_ok: bool, cd: bool) -> Message {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.checking_disabled = cd;
        m.add_query(Query::query(name(qname), qtype));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        edns.set_dnssec_ok(dnssec_ok);
        m.set_edns(edns);
        m
    }

    fn a_request(id: u16, qname: &str) -> Message {
        request(id, qname, RecordType::A, false, false)
    }

    /// A response to `q` with its id and question, RA set and an OPT record.
    fn response_to(q: &Message, rcode: ResponseCode) -> Message {
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.response_code = rcode;
        m.queries = q.queries.clone();
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.set_edns(edns);
        m
    }

    fn a_answer(q: &Message, ttl: u32, addrs: &[Ipv4Addr]) -> Message {
        let mut m = response_to(q, ResponseCode::NoError);
        for addr in addrs {
            m.add_answer(Record::from_rdata(
                q.queries[0].name.clone(),
                ttl,
                RData::A(A(*addr)),
            ));
        }
        m
    }

    fn negative(q: &Message, rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = response_to(q, rcode);
        let soa = SOA::new(
            name("example."),
            name("hostmaster.example."),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        m.add_authority(Record::from_rdata(
            name("example."),
            soa_ttl,
            RData::SOA(soa),
        ));
        m
    }

    fn answer_ips(m: &Message) -> Vec<IpAddr> {
        m.answers.iter().filter_map(|r| r.data.ip_addr()).collect()
    }

    fn cfg(upstreams: &[SocketAddr]) -> ForwardConfig {
        ForwardConfig {
            upstreams: upstreams.to_vec(),
            timeout: Duration::from_millis(300),
            attempts: 1,
            ..ForwardConfig::default()
        }
    }

    /// Waits for a condition (bounded, so a bug fails instead of hanging).
    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("gave up waiting for {what}");
    }

    fn answering(ttl: u32) -> impl Fn(&Message, Transport) -> Vec<Reply> + Send + Sync + 'static {
        move |q, _| vec![Reply::Msg(a_answer(q, ttl, &[ip(1)]))]
    }

    // ---- tests ----

    #[tokio::test]
    async fn response_shape_and_cache_hit_with_decremented_ttl() {
        let up = FakeUpstream::start(answering(300)).await;
        let fwd = Forwarder::new(cfg(&[up.addr]));

        let mut req = a_request(0x1234, "WWW.Example.COM.");
        req.metadata.checking_disabled = false;
        let resp = fwd.forward(&req).await;
        assert_eq!(resp.metadata.id, 0x1234);
        assert_eq!(resp.metadata.message_type, MessageType::Response);
        assert_eq!(resp.queries, req.queries);
        assert!(
            resp.queries[0].name.eq_case(&name("WWW.Example.COM.")),
            "question echoed as asked"
        );
        assert!(resp.metadata.recursion_desired && resp.metadata.recursion_available);
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert!(resp.edns.is_none(), "the upstream's OPT is not passed on");
        assert_eq!(answer_ips(&resp), vec![IpAddr::V4(ip(1))]);
        assert_eq!(resp.answers[0].ttl, 300);

        // What went upstream: RD, EDNS 1232, the client's DO, one question.
        let sent = up.seen();
        assert_eq!(sent.len(), 1);
        assert!(sent[0].metadata.recursion_desired);
        let edns = sent[0].edns.as_ref().expect("EDNS upstream");
        assert_eq!(edns.max_payload(), UPSTREAM_EDNS_PAYLOAD);
        assert!(!edns.flags().dnssec_ok);
        assert_eq!(sent[0].queries, req.queries);

        fwd.advance_clock(Duration::from_secs(10));
        let mut req2 = a_request(0x4321, "www.example.com.");
        req2.metadata.recursion_desired = false;
        let resp2 = fwd.forward(&req2).await;
        assert_eq!(up.udp(), 1, "second query answered from the cache");
        assert_eq!(resp2.metadata.id, 0x4321);
        assert_eq!(resp2.queries, req2.queries);
        assert!(!resp2.metadata.recursion_desired && resp2.metadata.recursion_available);
        assert_eq!(resp2.answers[0].ttl, 290);
        let stats = fwd.stats();
        assert_eq!((stats.queries, stats.cache_hits, stats.entries), (2, 1, 1));
    }

    #[tokio::test]
    async fn dnssec_ok_and_checking_disabled_make_separate_entries() {
        let up = FakeUpstream::start(answering(300)).await;
        let fwd = Forwarder::new(cfg(&[up.addr]));
        let bits = [(false, false), (true, false), (false, true), (true, true)];
        for round in 0..2 {
            for (i, (d, c)) in bits.iter().enumerate() {
                let resp = fwd
                    .forward(&request(i as u16, "example.com.", RecordType::A, *d, *c))
                    .await;
                assert_eq!(resp.metadata.checking_disabled, *c, "CD copied");
                assert_eq!(answer_ips(&resp).len(), 1, "round {round}");
            }
        }
        assert_eq!(up.udp(), 4, "one upstream query per (DO, CD) combination");
        let sent: Vec<_> = up
            .seen()
            .iter()
            .map(|m| {
                (
                    m.edns.as_ref().unwrap().flags().dnssec_ok,
                    m.metadata.checking_disabled,
                )
            })
            .collect();
        assert_eq!(sent, bits.to_vec(), "DO and CD passed upstream");
        assert_eq!(fwd.stats().entries, 4);
        assert_eq!(fwd.stats().cache_hits, 4);
    }

    #[tokio::test]
    async fn identical_concurrent_queries_share_one_upstream_query() {
        let release = Arc::new(Notify::new());
        let up = {
            let release = release.clone();
            FakeUpstream::start(move |q, _| {
                vec![
                    Reply::Wait(release.clone()),
                    Reply::Msg(a_answer(q, 60, &[ip(7)])),
                ]
            })
            .await
        };
        let fwd = Arc::new(Forwarder::new(ForwardConfig {
            timeout: Duration::from_secs(30),
            ..cfg(&[up.addr])
        }));
        let mut tasks = tokio::task::JoinSet::new();
        for id in 1..=10u16 {
            let fwd = fwd.clone();
            // Differently cased names are the same question.
            let qname = if id % 2 == 0 {
                "Coalesce.Example.com."
            } else {
                "coalesce.example.com."
            };
            tasks.spawn(async move { (id, fwd.forward(&a_request(id, qname)).await) });
        }
        wait_until("nine waiters", || fwd.stats().coalesced == 9).await;
        release.notify_one();
        let mut ids = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (id, resp) = done.unwrap();
            assert_eq!(resp.metadata.id, id, "each waiter gets its own id");
            assert_eq!(answer_ips(&resp), vec![IpAddr::V4(ip(7))]);
            ids.push(id);
        }
        ids.sort_unstable();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>());
        assert_eq!(up.udp(), 1, "one upstream query for ten clients");
        assert_eq!(fwd.stats().coalesced, 9);
    }

    #[tokio::test]
    async fn a_cancelled_leader_does_not_strand_its_followers() {
        let release = Arc::new(Notify::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let up = {
            let (release, calls) = (release.clone(), calls.clone());
            FakeUpstream::start(move |q, _| {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    vec![
                        Reply::Wait(release.clone()),
                        Reply::Msg(a_answer(q, 60, &[ip(1)])),
                    ]
                } else {
                    vec![Reply::Msg(a_answer(q, 60, &[ip(2)]))]
                }
            })
            .await
        };
        let fwd = Arc::new(Forwarder::new(ForwardConfig {
            timeout: Duration::from_secs(30),
            ..cfg(&[up.addr])
        }));
        let leader = {
            let fwd = fwd.clone();
            tokio::spawn(async move { fwd.forward(&a_request(1, "example.com.")).await })
        };
        wait_until("the leader's upstream query", || up.udp() == 1).await;
        let follower = {
            let fwd = fwd.clone();
            tokio::spawn(async move { fwd.forward(&a_request(2, "example.com.")).await })
        };
        wait_until("the follower", || fwd.stats().coalesced == 1).await;
        leader.abort();
        let resp = follower.await.unwrap();
        assert_eq!(resp.metadata.id, 2);
        assert_eq!(
            answer_ips(&resp),
            vec![IpAddr::V4(ip(2))],
            "the follower asked again"
        );
        assert_eq!(up.udp(), 2);
        release.notify_one();
    }

    #[tokio::test]
    async fn spoofed_and_malformed_answers_are_ignored() {
        let up = FakeUpstream::start(|q, _| {
            let spoof = || a_answer(q, 300, &[ip(66)]);
            let mut wrong_id = spoof();
            wrong_id.metadata.id = q.metadata.id.wrapping_add(1);
            let mut wrong_name = spoof();
            wrong_name.queries[0].name = name("evil.example.");
            let mut wrong_type = spoof();
            wrong_type.queries[0].query_type = RecordType::AAAA;
            let mut wrong_class = spoof();
            wrong_class.queries[0].query_class = DNSClass::CH;
            let mut no_question = spoof();
            no_question.queries.clear();
            let mut two_questions = spoof();
            two_questions.queries.push(q.queries[0].clone());
            let mut not_a_response = spoof();
            not_a_response.metadata.message_type = MessageType::Query;
            let good = a_answer(q, 300, &[ip(1)]).to_vec().unwrap();
            vec![
                Reply::Bytes(vec![0xde, 0xad]),
                Reply::Bytes(Vec::new()),
                Reply::Bytes(good[..good.len() - 3].to_vec()),
                Reply::Msg(wrong_id),
                Reply::Msg(wrong_name),
                Reply::Msg(wrong_type),
                Reply::Msg(wrong_class),
                Reply::Msg(no_question),
                Reply::Msg(two_questions),
                Reply::Msg(not_a_response),
                Reply::FromElsewhere(spoof()),
                Reply::Bytes(good),
            ]
        })
        .await;
        let fwd = Forwarder::new(cfg(&[up.addr]));
        // The upstream echoes the question in another case: still a match.
        let resp = fwd.forward(&a_request(9, "Example.COM.")).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_ips(&resp), vec![IpAddr::V4(ip(1))]);
        assert_eq!(fwd.stats().upstream_failures, 0);
    }

    #[tokio::test]
    async fn only_spoofed_answers_mean_servfail() {
        let up = FakeUpstream::start(|q, _| {
            let mut wrong_id = a_answer(q, 300, &[ip(66)]);
            wrong_id.metadata.id = q.metadata.id.wrapping_add(1);
            vec![
                Reply::Msg(wrong_id),
                Reply::FromElsewhere(a_answer(q, 300, &[ip(66)])),
            ]
        })
        .await;
        let fwd = Forwarder::new(ForwardConfig {
            timeout: Duration::from_millis(150),
            ..cfg(&[up.addr])
        });
        let resp = fwd.forward(&a_request(3, "example.com.")).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
        assert!(resp.answers.is_empty());
        assert_eq!(fwd.stats().upstream_failures, 1);
        assert_eq!(fwd.stats().entries, 0);
    }

    #[tokio::test]
    async fn truncated_udp_answer_is_retried_over_tcp() {
        let many: Vec<Ipv4Addr> = (1..=60).map(ip).collect();
        let up = FakeUpstream::start(move |q, transport| match transport {
            Transport::Udp => {
                let mut tc = response_to(q, ResponseCode::NoError);
                tc.metadata.truncation = true;
                vec![Reply::Msg(tc)]
            }
            Transport::Tcp => vec![Reply::Msg(a_answer(q, 300, &many))],
        })
        .await;
        let fwd = Forwarder::new(cfg(&[up.addr]));
        let req = a_request(5, "big.example.com.");
        let resp = fwd.forward(&req).await;
        assert_eq!((up.udp(), up.tcp()), (1, 1));
        assert!(!resp.metadata.truncation);
        assert_eq!(resp.answers.len(), 60);
        let sent = up.seen();
        assert_ne!(sent[0].metadata.id, 0, "sanity");
        assert_eq!(sent[1].queries, req.queries, "the same question over TCP");
        assert_eq!(
            sent[1].edns.as_ref().map(Edns::max_payload),
            Some(UPSTREAM_EDNS_PAYLOAD)
        );
    }

    #[tokio::test]
    async fn fails_over_to_the_second_upstream() {
        let silent = FakeUpstream::start(|_, _| Vec::new()).await;
        let mut closed = FakeUpstream::start(|_, _| Vec::new()).await;
        closed.stop().await;
        let servfail =
            FakeUpstream::start(|q, _| vec![Reply::Msg(response_to(q, ResponseCode::ServFail))])
                .await;
        let good = FakeUpstream::start(answering(300)).await;
        let fwd = Forwarder::new(ForwardConfig {
            timeout: Duration::from_millis(150),
            ..cfg(&[silent.addr, closed.addr, servfail.addr, good.addr])
        });
        let resp = fwd.forward(&a_request(1, "one.example.com.")).await;
        assert_eq!(answer_ips(&resp), vec![IpAddr::V4(ip(1))]);
        assert_eq!((silent.udp(), servfail.udp(), good.udp()), (1, 1, 1));
        assert_eq!(fwd.stats().upstream_failures, 3);
    }

    #[tokio::test]
    async fn serves_stale_when_the_upstream_is_gone() {
        let mut up = FakeUpstream::start(answering(60)).await;
        let fwd = Forwarder::new(ForwardConfig {
            timeout: Duration::from_millis(150),
            ..cfg(&[up.addr])
        });
        let fresh = fwd.forward(&a_request(1, "stale.example.com.")).await;
        assert_eq!(fresh.answers[0].ttl, 60);
        up.stop().await;

        fwd.advance_clock(Duration::from_secs(120));
        let stale = fwd.forward(&a_request(2, "stale.example.com.")).await;
        assert_eq!(stale.metadata.id, 2);
        assert_eq!(stale.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_ips(&stale), vec![IpAddr::V4(ip(1))]);
        assert_eq!(stale.answers[0].ttl, 30, "RFC 8767 stale TTL");
        assert_eq!(fwd.stats().stale_served, 1);

        // Past the serve-stale window (1 h): gone.
        fwd.advance_clock(Duration::from_secs(3600));
        let gone = fwd.forward(&a_request(3, "stale.example.com.")).await;
        assert_eq!(gone.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(fwd.stats().stale_served, 1);
        assert_eq!(fwd.stats().entries, 0);
    }

    #[tokio::test]
    async fn stale_answers_hold_off_upstream_retries_for_a_while() {
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = {
            let down = down.clone();
            FakeUpstream::start(move |q, _| {
                if down.load(Ordering::SeqCst) {
                    Vec::new()
                } else {
                    vec![Reply::Msg(a_answer(q, 60, &[ip(1)]))]
                }
            })
            .await
        };
        let fwd = Forwarder::new(ForwardConfig {
            timeout: Duration::from_millis(100),
            ..cfg(&[up.addr])
        });
        let ask = |id| {
            let fwd = &fwd;
            async move { fwd.forward(&a_request(id, "hold.example.com.")).await }
        };
        assert_eq!(ask(1).await.answers[0].ttl, 60);
        down.store(true, Ordering::SeqCst);

        fwd.advance_clock(Duration::from_secs(120));
        assert_eq!(ask(2).await.answers[0].ttl, 30);
        assert_eq!(up.udp(), 2, "the refresh was tried");
        let held = ask(3).await;
        assert_eq!((held.metadata.id, held.answers[0].ttl), (3, 30));
        assert_eq!(up.udp(), 2, "stale at once while held down");

        fwd.advance_clock(Duration::from_secs(31));
        assert_eq!(ask(4).await.answers[0].ttl, 30);
        assert_eq!(up.udp(), 3, "tried again after the hold-down");
        assert_eq!(fwd.stats().stale_served, 3);

        down.store(false, Ordering::SeqCst);
        fwd.advance_clock(Duration::from_secs(31));
        assert_eq!(ask(5).await.answers[0].ttl, 60, "fresh again");
        assert_eq!(ask(6).await.answers[0].ttl, 60);
        assert_eq!(up.udp(), 4);
    }

    #[tokio::test]
    async fn servfail_without_a_stale_entry() {
        let silent = FakeUpstream::start(|_, _| Vec::new()).await;
        let fwd = Forwarder::new(ForwardConfig {
            timeout: Duration::from_millis(100),
            attempts: 2,
            ..cfg(&[silent.addr])
        });
        let req = a_request(77, "nothing.example.com.");
        let resp = fwd.forward(&req).await;
        assert_eq!(resp.metadata.id, 77);
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(resp.queries, req.queries);
        assert!(resp.metadata.recursion_available);
        assert_eq!(silent.udp(), 2, "two attempts");
        assert_eq!(fwd.stats().upstream_failures, 2);

        // And without any upstream at all.
        let none = Forwarder::new(ForwardConfig::default());
        let resp = none.forward(&req).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn negative_answers_are_cached_from_the_soa() {
        let up = FakeUpstream::start(|q, _| {
            let label = q.queries[0].name.to_ascii();
            let m = if label.starts_with("nx.") {
                negative(q, ResponseCode::NXDomain, 600, 60)
            } else if label.starts_with("nodata.") {
                negative(q, ResponseCode::NoError, 20, 900)
            } else if label.starts_with("long.") {
                negative(q, ResponseCode::NXDomain, 86400, 86400)
            } else {
                response_to(q, ResponseCode::NXDomain) // no SOA
            };
            vec![Reply::Msg(m)]
        })
        .await;
        let fwd = Forwarder::new(cfg(&[up.addr]));
        let soa_ttl = |m: &Message| m.authorities[0].ttl;

        let nx = fwd.forward(&a_request(1, "nx.example.")).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(soa_ttl(&nx), 60, "min(SOA TTL, SOA minimum)");
        let nodata = fwd.forward(&a_request(2, "nodata.example.")).await;
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(soa_ttl(&nodata), 20);
        let long = fwd.forward(&a_request(3, "long.example.")).await;
        assert_eq!(soa_ttl(&long), 300, "capped by negative_ttl_max");
        let _ = fwd.forward(&a_request(4, "nosoa.example.")).await;
        assert_eq!(up.udp(), 4);

        fwd.advance_clock(Duration::from_secs(30));
        let nx = fwd.forward(&a_request(5, "nx.example.")).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(soa_ttl(&nx), 30);
        let _ = fwd.forward(&a_request(6, "nosoa.example.")).await;
        assert_eq!(up.udp(), 5, "NXDOMAIN cached, NXDOMAIN without SOA not");

        fwd.advance_clock(Duration::from_secs(31));
        let _ = fwd.forward(&a_request(7, "nx.example.")).await;
        let _ = fwd.forward(&a_request(8, "long.example.")).await;
        assert_eq!(up.udp(), 6, "nx expired after 60 s, long still cached");
    }

    #[tokio::test]
    async fn ttls_are_clamped() {
        let up = FakeUpstream::start(|q, _| {
            let ttl = if q.queries[0].name.to_ascii().starts_with("zero.") {
                0
            } else {
                86400
            };
            vec![Reply::Msg(a_answer(q, ttl, &[ip(1)]))]
        })
        .await;
        let fwd = Forwarder::new(ForwardConfig {
            max_ttl: 100,
            min_ttl: 5,
            ..cfg(&[up.addr])
        });
        assert_eq!(
            fwd.forward(&a_request(1, "long.example.")).await.answers[0].ttl,
            100
        );
        assert_eq!(
            fwd.forward(&a_request(2, "zero.example.")).await.answers[0].ttl,
            5
        );
        let _ = fwd.forward(&a_request(3, "zero.example.")).await;
        assert_eq!(up.udp(), 2, "raised to min_ttl, hence cached");

        // With the default min_ttl 0, a TTL-0 answer is not cached.
        let fwd = Forwarder::new(cfg(&[up.addr]));
        let _ = fwd.forward(&a_request(1, "zero.example.")).await;
        let _ = fwd.forward(&a_request(2, "zero.example.")).await;
        assert_eq!(up.udp(), 4);
        assert_eq!(fwd.stats().entries, 0);
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_bound() {
        let up = FakeUpstream::start(answering(300)).await;
        let fwd = Forwarder::new(ForwardConfig {
            cache_entries: 8,
            ..cfg(&[up.addr])
        });
        for i in 0..50u16 {
            let _ = fwd.forward(&a_request(i, &format!("n{i}.example."))).await;
            assert!(fwd.stats().entries <= 8);
        }
        assert_eq!(fwd.stats().entries, 8);

        let off = Forwarder::new(ForwardConfig {
            cache_entries: 0,
            ..cfg(&[up.addr])
        });
        let _ = off.forward(&a_request(1, "a.example.")).await;
        assert_eq!(off.stats().entries, 0);
    }

    #[tokio::test]
    async fn requests_without_a_question_get_formerr() {
        let fwd = Forwarder::new(ForwardConfig::default());
        let mut req = Message::new(4, MessageType::Query, OpCode::Query);
        req.metadata.recursion_desired = true;
        let resp = fwd.forward(&req).await;
        assert_eq!(resp.metadata.id, 4);
        assert_eq!(resp.metadata.response_code, ResponseCode::FormErr);
        let mut update = a_request(5, "example.com.");
        update.metadata.op_code = OpCode::Update;
        assert_eq!(
            fwd.forward(&update).await.metadata.response_code,
            ResponseCode::NotImp
        );
    }

    // ---- the cache alone, on a synthetic clock ----

    fn key(n: &str) -> CacheKey {
        CacheKey::new(&Query::query(name(n), RecordType::A), false, false)
    }

    fn entry(stored: Instant, ttl: u32) -> Arc<Cached> {
        Arc::new(Cached {
            rcode: ResponseCode::NoError,
            authentic_data: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            stored,
            ttl,
        })
    }

    fn is_fresh(cache: &mut Cache, k: &str, now: Instant) -> bool {
        matches!(cache.lookup(&key(k), now), Some((_, false)))
    }

    fn present(cache: &Cache, k: &str) -> bool {
        cache.map.contains_key(&key(k))
    }

    fn assert_index_consistent(cache: &Cache) {
        assert_eq!(cache.keys.len(), cache.map.len());
        for (i, k) in cache.keys.iter().enumerate() {
            assert_eq!(cache.map[k].index, i);
        }
    }

    #[test]
    fn eviction_takes_expired_entries_first() {
        let t0 = Instant::now();
        let mut cache = Cache::new(4, Duration::from_secs(3600));
        cache.insert(key("a."), entry(t0, 100));
        cache.insert(key("b."), entry(t0, 1));
        cache.insert(key("c."), entry(t0, 100));
        cache.insert(key("d."), entry(t0, 50));
        let later = t0 + Duration::from_secs(10);
        cache.insert(key("e."), entry(later, 100));
        assert_eq!(cache.len(), 4);
        assert!(!present(&cache, "b."), "the expired entry went first");
        cache.insert(key("f."), entry(later, 100));
        assert!(!present(&cache, "d."), "then the one expiring soonest");
        for k in ["a.", "c.", "e.", "f."] {
            assert!(is_fresh(&mut cache, k, later), "{k}");
        }
        assert_index_consistent(&cache);
    }

    #[test]
    fn large_cache_eviction_keeps_the_bound_and_the_index() {
        let t0 = Instant::now();
        let mut cache = Cache::new(100, Duration::from_secs(60));
        for i in 0..1000u32 {
            cache.insert(key(&format!("n{i}.")), entry(t0, i % 7));
            assert!(cache.len() <= 100);
        }
        assert_index_consistent(&cache);
    }

    #[test]
    fn fresh_stale_hold_down_and_dead() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hold = Duration::from_secs(5);
        let mut cache = Cache::new(10, Duration::from_secs(60));
        cache.insert(key("x."), entry(t0, 10));
        assert!(is_fresh(&mut cache, "X.", at(9)), "case-insensitive");
        assert!(
            cache.lookup(&key("x."), at(10)).is_none(),
            "expired: ask upstream"
        );
        // The refresh failed: stale, and served from the cache for `hold`.
        assert!(cache.stale(&key("x."), at(20), hold).is_some());
        assert!(matches!(cache.lookup(&key("x."), at(24)), Some((_, true))));
        assert!(
            cache.lookup(&key("x."), at(25)).is_none(),
            "hold-down over: ask again"
        );
        // A new answer ends the hold-down.
        cache.stale(&key("x."), at(30), hold);
        cache.insert(key("x."), entry(at(31), 10));
        assert!(is_fresh(&mut cache, "x.", at(32)));
        assert!(cache.lookup(&key("x."), at(42)).is_none());
        // Past the serve-stale window the entry is dropped when seen.
        assert!(cache.stale(&key("x."), at(101), hold).is_none());
        assert_eq!(cache.len(), 0);
        assert_index_consistent(&cache);
    }

    #[test]
    fn forwarder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Forwarder>();
    }
}
