//! Agent health (`/healthz`, `/livez`), Prometheus metrics (`/metrics`) and
//! the per-Service `healthCheckNodePort` servers.
//!
//! The semantics follow kube-proxy: `/healthz` turns 503 when an update has
//! waited longer than a bound without the dataplane applying it (so a node
//! whose rules went stale drops out of load balancers), `/livez` only says the
//! process answers, and a `healthCheckNodePort` answers 200 while the Service
//! has a ready endpoint on this node and 503 otherwise (so an external load
//! balancer drains the node before its last local endpoint goes away).

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A client must send a whole request head within this time, and an idle
/// keep-alive connection is closed after it (hyper starts the timer whenever
/// it waits for a head), so probes that hang up badly do not pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (EMFILE and the like) before trying again,
/// rather than spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Upper bounds of the sync duration histogram, in seconds: kube-proxy's
/// `ExponentialBuckets(0.001, 2, 15)`, 1 ms to about 16 s.
const SYNC_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative; summed when rendered). Those
    /// above the last bound are only in `count`.
    buckets: [u64; SYNC_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = SYNC_BUCKETS.iter().position(|&le| v <= le) {
            self.buckets[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct Labeled {
    sync_duration: BTreeMap<String, Histogram>,
    sync_errors: BTreeMap<String, u64>,
    full_resyncs: BTreeMap<String, u64>,
}

/// The agent's Prometheus metrics, shared through an `Arc` by the dataplanes
/// (which record) and the HTTP server (which renders).
#[derive(Debug, Default)]
pub struct Metrics {
    labeled: Mutex<Labeled>,
    services: AtomicU64,
    endpoints: AtomicU64,
    revision: AtomicU64,
    conntrack_deleted: AtomicU64,
    /// `f64` bits of the UNIX time of the last sync; 0 before the first.
    last_sync: AtomicU64,
    /// The node's cluster DNS server, when it runs: its counters are
    /// rendered with the rest.
    dns: std::sync::OnceLock<std::sync::Arc<weft_dns::ClusterDns>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Render the counters of this node's cluster DNS server too.
    pub fn set_dns(&self, dns: std::sync::Arc<weft_dns::ClusterDns>) {
        let _ = self.dns.set(dns);
    }

    /// A sync of `dataplane` completed in `seconds`: one observation of
    /// `weft_sync_duration_seconds`, and `weft_last_sync_timestamp_seconds`
    /// becomes now. Call it for syncs that succeeded; a failed one is
    /// [`Metrics::sync_error`].
    pub fn observe_sync(&self, dataplane: &str, seconds: f64) {
        self.observe_sync_at(dataplane, seconds, SystemTime::now());
    }

    /// [`Metrics::observe_sync`] with the time of the sync given.
    pub fn observe_sync_at(&self, dataplane: &str, seconds: f64, at: SystemTime) {
        // A negative or NaN duration can only come from a caller's bug; it
        // must not poison the sum for the process's lifetime.
        let seconds = if seconds.is_finite() && seconds > 0.0 {
            seconds
        } else {
            0.0
        };
        self.lock()
            .sync_duration
            .entry(dataplane.to_string())
            .or_default()
            .observe(seconds);
        let at = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.last_sync.store(at.to_bits(), Ordering::Relaxed);
    }

    /// What the service dataplane has programmed now.
    pub fn set_programmed(&self, services: u64, endpoints: u64) {
        self.services.store(services, Ordering::Relaxed);
        self.endpoints.store(endpoints, Ordering::Relaxed);
    }

    /// A sync of `dataplane` failed.
    pub fn sync_error(&self, dataplane: &str) {
        *self
            .lock()
            .sync_errors
            .entry(dataplane.to_string())
            .or_default() += 1;
    }

    /// The dataplane rebuilt everything instead of applying a delta, for
    /// `reason` (a short fixed word such as `reset`, `timer`, `drift`: it is a
    /// label value, so keep the set small).
    pub fn full_resync(&self, reason: &str) {
        *self
            .lock()
            .full_resyncs
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// `n` conntrack entries were deleted (stale UDP flows to removed endpoints).
    pub fn conntrack_deleted(&self, n: u64) {
        self.conntrack_deleted.fetch_add(n, Ordering::Relaxed);
    }

    /// The revision of the node view the agent holds.
    pub fn set_revision(&self, rev: u64) {
        self.revision.store(rev, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Labeled> {
        // A panic elsewhere while holding the lock leaves plain counters
        // behind, still worth reporting.
        self.labeled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let l = self.lock();

        header(
            &mut out,
            "weft_sync_duration_seconds",
            "Time a dataplane took to program the node's services, per sync.",
            "histogram",
        );
        for (dataplane, h) in &l.sync_duration {
            let dp = escape_label(dataplane);
            let mut cumulative = 0;
            for (le, n) in SYNC_BUCKETS.iter().zip(h.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "weft_sync_duration_seconds_bucket{{dataplane=\"{dp}\",le=\"{}\"}} {cumulative}",
                    fmt_f64(*le)
                );
            }
            let _ = writeln!(
                out,
                "weft_sync_duration_seconds_bucket{{dataplane=\"{dp}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "weft_sync_duration_seconds_sum{{dataplane=\"{dp}\"}} {}",
                fmt_f64(h.sum)
            );
            let _ = writeln!(
                out,
                "weft_sync_duration_seconds_count{{dataplane=\"{dp}\"}} {}",
                h.count
            );
        }

        labeled_counter(
            &mut out,
            "weft_sync_errors_total",
            "Dataplane syncs that failed.",
            "dataplane",
            &l.sync_errors,
        );
        labeled_counter(
            &mut out,
            "weft_full_resyncs_total",
            "Full rebuilds of the service dataplane, by reason.",
            "reason",
            &l.full_resyncs,
        );
        drop(l);

        let scalars: [(&str, &str, &str, String); 5] = [
            (
                "weft_services_programmed",
                "Services the service dataplane has programmed.",
                "gauge",
                self.services.load(Ordering::Relaxed).to_string(),
            ),
            (
                "weft_endpoints_programmed",
                "Endpoints the service dataplane has programmed.",
                "gauge",
                self.endpoints.load(Ordering::Relaxed).to_string(),
            ),
            (
                "weft_conntrack_entries_deleted_total",
                "Conntrack entries deleted for removed endpoints.",
                "counter",
                self.conntrack_deleted.load(Ordering::Relaxed).to_string(),
            ),
            (
                "weft_view_revision",
                "Revision of the node view the agent holds.",
                "gauge",
                self.revision.load(Ordering::Relaxed).to_string(),
            ),
            (
                "weft_last_sync_timestamp_seconds",
                "UNIX time of the last successful dataplane sync (0 before the first).",
                "gauge",
                fmt_f64(f64::from_bits(self.last_sync.load(Ordering::Relaxed))),
            ),
        ];
        for (name, help, kind, value) in &scalars {
            scalar(&mut out, name, help, kind, value);
        }
        if let Some(dns) = self.dns.get() {
            render_dns(&mut out, dns);
        }
        out
    }
}

/// The cluster DNS server's counters (`weft_dns_*`).
fn render_dns(out: &mut String, dns: &weft_dns::ClusterDns) {
    let st = &dns.stats;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let by_rcode: BTreeMap<String, u64> = [
        ("NXDOMAIN", &st.nxdomain),
        ("SERVFAIL", &st.servfail),
        ("FORMERR", &st.formerr),
        ("NOTIMP", &st.notimp),
        ("REFUSED", &st.refused),
    ]
    .into_iter()
    .map(|(rcode, c)| (rcode.to_string(), get(c)))
    .collect();
    labeled_counter(
        out,
        "weft_dns_responses_total",
        "DNS responses with an error rcode, by rcode.",
        "rcode",
        &by_rcode,
    );
    let snap = dns.snapshot();
    let mut scalars: Vec<(&str, &str, &str, u64)> = vec![
        (
            "weft_dns_requests_total",
            "DNS requests received by the node's cluster DNS server.",
            "counter",
            get(&st.queries),
        ),
        (
            "weft_dns_answered_locally_total",
            "Requests answered from the cluster zone without the upstreams.",
            "counter",
            get(&st.answered_locally),
        ),
        (
            "weft_dns_forwarded_total",
            "Requests forwarded to the upstream servers.",
            "counter",
            get(&st.forwarded),
        ),
        (
            "weft_dns_search_path_hits_total",
            "Search paths walked on the server (answered with a CNAME in one round trip).",
            "counter",
            get(&st.search_path_hits),
        ),
        (
            "weft_dns_truncated_total",
            "UDP responses sent truncated (TC).",
            "counter",
            get(&st.truncated),
        ),
        (
            "weft_dns_dropped_total",
            "Requests dropped unanswered (responses, shorter than a header).",
            "counter",
            get(&st.dropped),
        ),
        (
            "weft_dns_zone_services",
            "Services in the cluster zone.",
            "gauge",
            snap.services.len() as u64,
        ),
        (
            "weft_dns_zone_revision",
            "View revision the cluster zone was built from.",
            "gauge",
            snap.rev,
        ),
    ];
    if let Some(f) = dns.forwarder() {
        let f = f.stats();
        scalars.extend([
            (
                "weft_dns_cache_hits_total",
                "Forwarded requests answered from the cache.",
                "counter",
                f.cache_hits,
            ),
            (
                "weft_dns_coalesced_total",
                "Forwarded requests that joined an identical one in flight.",
                "counter",
                f.coalesced,
            ),
            (
                "weft_dns_upstream_failures_total",
                "Upstream exchanges that failed (timeout, error, bad answer).",
                "counter",
                f.upstream_failures,
            ),
            (
                "weft_dns_stale_served_total",
                "Expired cache entries served because the upstreams failed.",
                "counter",
                f.stale_served,
            ),
            (
                "weft_dns_cache_entries",
                "Entries in the forwarder's cache.",
                "gauge",
                f.entries,
            ),
        ]);
    }
    for (name, help, kind, value) in scalars {
        scalar(out, name, help, kind, value);
    }
}

/// One unlabeled metric with its header.
fn scalar(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn labeled_counter(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &BTreeMap<String, u64>,
) {
    header(out, name, help, "counter");
    for (v, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape_label(v));
    }
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A sample value: Rust prints `inf`/`NaN`, the format wants `+Inf`/`NaN`.
fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

// ---------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct HealthState {
    last_updated: Option<SystemTime>,
    pending_since: Option<SystemTime>,
    node_eligible: bool,
}

/// kube-proxy's proxier health: is the dataplane keeping up with updates?
///
/// The sync loop calls [`Health::queued`] when an update arrives and
/// [`Health::applied`] when the dataplane has programmed everything it holds
/// (after every sync, the first one included, even when there are no
/// Services). Unhealthy means an update has waited `bound` or longer.
///
/// Startup: kube-proxy answers 200 until its first update arrives. An agent
/// whose first sync never happens (stream never connected, dataplane failing
/// from the start) would then look healthy forever, so here a process that
/// has not synced once is healthy only for `bound` after it started, whatever
/// is queued.
#[derive(Debug)]
pub struct Health {
    bound: Duration,
    started: SystemTime,
    state: Mutex<HealthState>,
}

impl Health {
    /// Started now.
    pub fn new(bound: Duration) -> Health {
        Health::started_at(bound, SystemTime::now())
    }

    /// Started at `started` (tests, or a caller that knows when the process began).
    pub fn started_at(bound: Duration, started: SystemTime) -> Health {
        Health {
            bound,
            started,
            state: Mutex::new(HealthState {
                last_updated: None,
                pending_since: None,
                node_eligible: true,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An update arrived that the dataplane has not applied yet. Only the
    /// oldest pending one counts: a steady trickle of updates must not keep
    /// pushing the deadline back.
    pub fn queued(&self, now: SystemTime) {
        let mut s = self.lock();
        if s.pending_since.is_none() {
            s.pending_since = Some(now);
        }
    }

    /// The dataplane finished a sync: everything queued so far is applied.
    pub fn applied(&self, now: SystemTime) {
        let mut s = self.lock();
        s.last_updated = Some(now);
        s.pending_since = None;
    }

    /// Whether this node should take new load-balanced traffic (kube-proxy's
    /// `nodeEligible`: the agent sets it false once its Node is gone from the view). It only
    /// affects `/healthz`, not [`Health::healthy`] nor the
    /// `healthCheckNodePort` servers.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// Whether the dataplane is keeping up (kube-proxy's proxier health).
    pub fn healthy(&self, now: SystemTime) -> bool {
        let s = self.lock();
        self.healthy_locked(&s, now)
    }

    fn healthy_locked(&self, s: &HealthState, now: SystemTime) -> bool {
        // A clock that stepped back makes an age negative: count it as zero
        // rather than declaring the node unhealthy over a clock change.
        let age = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO);
        if s.last_updated.is_none() && age(self.started) >= self.bound {
            return false;
        }
        match s.pending_since {
            Some(p) => age(p) < self.bound,
            None => true,
        }
    }

    /// The `/healthz` answer: status code and JSON body.
    pub fn status(&self, now: SystemTime) -> (u16, serde_json::Value) {
        let s = self.lock();
        let healthy = self.healthy_locked(&s, now);
        let code = if healthy && s.node_eligible { 200 } else { 503 };
        let body = serde_json::json!({
            "lastUpdated": s.last_updated.map(rfc3339),
            "currentTime": rfc3339(now),
            "nodeEligible": s.node_eligible,
            "pendingSince": s.pending_since.map(rfc3339),
        });
        (code, body)
    }
}

/// `t` as an RFC 3339 UTC timestamp with second precision
/// (`2024-03-01T12:00:00Z`). Times before 1970 print as the epoch.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after
/// Howard Hinnant's `civil_from_days` (eras of 400 years starting in March,
/// so the leap day is the last day of the shifted year).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

type Body = Full<Bytes>;

fn response(code: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(code: u16, body: &serde_json::Value) -> Response<Body> {
    let mut r = response(code, "application/json", body.to_string());
    r.headers_mut().insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Serve requests on `listener` with `handler` (which sees GET and HEAD
/// only; other methods get 405) until the returned future is dropped, which
/// also closes every connection it accepted.
async fn accept_loop<H>(listener: TcpListener, what: &'static str, handler: H)
where
    H: Fn(&str) -> Response<Body> + Send + Sync + 'static,
{
    let local = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let handler = Arc::new(handler);
    // Connections live in the set so that dropping this future (a closed
    // healthCheckNodePort) aborts them too.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(server = what, addr = %local, error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let handler = handler.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let r = if req.method() == Method::GET || req.method() == Method::HEAD {
                            handler(req.uri().path())
                        } else {
                            let mut r = response(405, "text/plain", "method not allowed\n");
                            r.headers_mut()
                                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                            r
                        };
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(server = what, %peer, error = %e, "connection ended");
                    }
                });
            }
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(server = what, error = %e, "connection task panicked");
                    }
                }
            }
        }
    }
}

/// Serve `/healthz`, `/livez` and `/metrics` on `listener` until the future
/// is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>, metrics: Arc<Metrics>) {
    accept_loop(listener, "health", move |path| match path {
        "/healthz" => {
            let (code, body) = health.status(SystemTime::now());
            json_response(code, &body)
        }
        // Liveness is the process answering: a dataplane that cannot sync
        // is for /healthz to report, restarting the agent would not fix it.
        "/livez" => response(200, "text/plain; charset=utf-8", "ok"),
        "/metrics" => response(200, "text/plain; version=0.0.4", metrics.render()),
        _ => response(404, "text/plain; charset=utf-8", "not found\n"),
    })
    .await
}

// ---------------------------------------------------------------------------
// healthCheckNodePort servers
// ---------------------------------------------------------------------------

/// What one `healthCheckNodePort` reports about its Service on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceHealthState {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node.
    pub local_endpoints: usize,
    /// Serving but terminating endpoints on this node. They do not make the
    /// port healthy: the load balancer should drain the node while they
    /// finish their connections.
    pub local_serving_terminating: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceHealthError {
    #[error("healthCheckNodePort {port} of {namespace}/{name}: cannot listen on {addr}: {source}")]
    Bind {
        port: u16,
        addr: SocketAddr,
        namespace: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("healthCheckNodePort of {namespace}/{name} is 0")]
    ZeroPort { namespace: String, name: String },
}

struct PortServer {
    state: Arc<RwLock<ServiceHealthState>>,
    /// The addresses this port listens on; missing ones failed to bind and
    /// are retried on the next sync.
    listeners: BTreeMap<IpAddr, JoinHandle<()>>,
}

/// kube-proxy's service health server: one HTTP server per
/// `healthCheckNodePort` (Services with `externalTrafficPolicy: Local`) and
/// bind address, answering whether the Service has a ready endpoint here.
pub struct ServiceHealth {
    bind: Vec<IpAddr>,
    proxy: Option<Arc<Health>>,
    ports: BTreeMap<u16, PortServer>,
}

impl ServiceHealth {
    /// Listen on each of `bind` (all IPv4 addresses when empty).
    pub fn new(bind: Vec<IpAddr>) -> ServiceHealth {
        let mut bind: Vec<IpAddr> = bind
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if bind.is_empty() {
            bind.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        }
        ServiceHealth {
            bind,
            proxy: None,
            ports: BTreeMap::new(),
        }
    }

    /// Also answer 503 while the node's dataplane is unhealthy, and say so in
    /// `serviceProxyHealthy` (kube-proxy does this: a node with stale rules
    /// should not get load-balanced traffic for any Service).
    pub fn with_proxy_health(mut self, health: Arc<Health>) -> ServiceHealth {
        self.proxy = Some(health);
        self
    }

    /// Ports listening on at least one address.
    pub fn ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .filter(|(_, s)| !s.listeners.is_empty())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Serve exactly `want`: close the ports not in it (their listeners and
    /// connections are gone when this returns), open new ones, update the
    /// counts of the others in place. A port that cannot listen on an
    /// address is reported and retried on the next sync; other ports and
    /// addresses are unaffected.
    pub async fn sync(
        &mut self,
        want: BTreeMap<u16, ServiceHealthState>,
    ) -> Vec<ServiceHealthError> {
        let gone: Vec<u16> = self
            .ports
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(server) = self.ports.remove(&port) {
                let service = service_key(&read(&server.state));
                for (addr, task) in server.listeners {
                    task.abort();
                    // Awaiting the aborted task means its listener has been
                    // dropped: the port refuses connections from now on.
                    let _ = task.await;
                    tracing::info!(port, %addr, %service, "health check port closed");
                }
            }
        }

        let mut errors = Vec::new();
        for (port, state) in want {
            if port == 0 {
                errors.push(ServiceHealthError::ZeroPort {
                    namespace: state.namespace,
                    name: state.name,
                });
                continue;
            }
            let server = self.ports.entry(port).or_insert_with(|| PortServer {
                state: Arc::new(RwLock::new(state.clone())),
                listeners: BTreeMap::new(),
            });
            {
                let mut current = server.state.write().unwrap_or_else(|p| p.into_inner());
                if *current != state {
                    tracing::debug!(
                        port,
                        service = %service_key(&state),
                        local_endpoints = state.local_endpoints,
                        local_serving_terminating = state.local_serving_terminating,
                        "health check port updated"
                    );
                    *current = state.clone();
                }
            }
            for addr in &self.bind {
                if server.listeners.contains_key(addr) {
                    continue;
                }
                let sa = SocketAddr::new(*addr, port);
                match TcpListener::bind(sa).await {
                    Ok(listener) => {
                        let task = tokio::spawn(accept_loop(
                            listener,
                            "healthCheckNodePort",
                            service_handler(server.state.clone(), self.proxy.clone()),
                        ));
                        server.listeners.insert(*addr, task);
                        tracing::info!(port, addr = %sa, service = %service_key(&state), "health check port listening");
                    }
                    Err(source) => {
                        let e = ServiceHealthError::Bind {
                            port,
                            addr: sa,
                            namespace: state.namespace.clone(),
                            name: state.name.clone(),
                            source,
                        };
                        tracing::warn!(error = %e, "health check port not listening; retrying on the next sync");
                        errors.push(e);
                    }
                }
            }
        }
        errors
    }
}

impl Drop for ServiceHealth {
    fn drop(&mut self) {
        for server in self.ports.values() {
            for task in server.listeners.values() {
                task.abort();
            }
        }
    }
}

fn read(state: &RwLock<ServiceHealthState>) -> std::sync::RwLockReadGuard<'_, ServiceHealthState> {
    state.read().unwrap_or_else(|p| p.into_inner())
}

fn service_key(s: &ServiceHealthState) -> String {
    format!("{}/{}", s.namespace, s.name)
}

/// Any path: 200 while the Service has a ready local endpoint (and the
/// proxy is healthy, when tied to it), else 503; kube-proxy's body.
fn service_handler(
    state: Arc<RwLock<ServiceHealthState>>,
    proxy: Option<Arc<Health>>,
) -> impl Fn(&str) -> Response<Body> + Send + Sync + 'static {
    move |_path| {
        let proxy_healthy = proxy.as_ref().is_none_or(|h| h.healthy(SystemTime::now()));
        let s = read(&state);
        let code = if s.local_endpoints > 0 && proxy_healthy {
            200
        } else {
            503
        };
        let body = serde_json::json!({
            "service": {"namespace": s.namespace, "name": s.name},
            "localEndpoints": s.local_endpoints,
            "serviceProxyHealthy": proxy_healthy,
        });
        json_response(code, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// `name{labels}` → value, from Prometheus text; checks every sample
    /// belongs to a family announced by `# TYPE`.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut families = BTreeSet::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                families.insert(it.next().unwrap().to_string());
                assert!(matches!(it.next(), Some("counter" | "gauge" | "histogram")));
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect(line);
            let name = key.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
                .unwrap_or(name);
            assert!(families.contains(family), "{line}: no # TYPE for {family}");
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect(line),
            };
            assert!(samples.insert(key.to_string(), v).is_none(), "{line} twice");
        }
        samples
    }

    #[test]
    fn rfc3339_dates() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (86_399, "1970-01-01T23:59:59Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (1_709_251_199, "2024-02-29T23:59:59Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(at(secs)), want);
        }
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn metrics_render() {
        fn shared<T: Send + Sync>() {}
        shared::<Metrics>();
        shared::<Health>();

        let m = Metrics::new();
        let empty = parse(&m.render());
        assert_eq!(empty["weft_services_programmed"], 0.0);
        assert_eq!(empty["weft_last_sync_timestamp_seconds"], 0.0);
        assert!(!empty.keys().any(|k| k.starts_with("weft_sync_duration")));

        m.observe_sync_at("iptables", 0.003, at(1_700_000_000));
        m.observe_sync("iptables", 0.5);
        m.observe_sync_at("iptables", 20.0, at(1_700_000_100));
        m.observe_sync_at("ebpf", 0.001, at(1_700_000_200));
        m.observe_sync_at("ebpf", -1.0, at(1_700_000_300));
        m.set_programmed(12, 34);
        m.sync_error("iptables");
        m.sync_error("iptables");
        m.sync_error("ebpf");
        m.full_resync("reset");
        m.full_resync("we\"ird\\\n");
        m.conntrack_deleted(3);
        m.conntrack_deleted(4);
        m.set_revision(99);
        let text = m.render();
        let s = parse(&text);

        let b = |dp: &str, le: &str| {
            s[&format!("weft_sync_duration_seconds_bucket{{dataplane=\"{dp}\",le=\"{le}\"}}")]
        };
        assert_eq!(b("iptables", "0.001"), 0.0);
        assert_eq!(b("iptables", "0.002"), 0.0);
        assert_eq!(b("iptables", "0.004"), 1.0);
        assert_eq!(b("iptables", "0.512"), 2.0);
        assert_eq!(b("iptables", "16.384"), 2.0);
        assert_eq!(b("iptables", "+Inf"), 3.0);
        assert_eq!(
            s["weft_sync_duration_seconds_count{dataplane=\"iptables\"}"],
            3.0
        );
        assert!(
            (s["weft_sync_duration_seconds_sum{dataplane=\"iptables\"}"] - 20.503).abs() < 1e-9
        );
        // An upper bound is inclusive; a negative duration counts as 0.
        assert_eq!(b("ebpf", "0.001"), 2.0);
        assert_eq!(
            s["weft_sync_duration_seconds_sum{dataplane=\"ebpf\"}"],
            0.001
        );
        // Buckets are cumulative and end with +Inf.
        for dp in ["iptables", "ebpf"] {
            let mut prev = 0.0;
            for le in SYNC_BUCKETS
                .iter()
                .map(|l| l.to_string())
                .chain(["+Inf".into()])
            {
                assert!(b(dp, &le) >= prev);
                prev = b(dp, &le);
            }
        }
        assert_eq!(SYNC_BUCKETS.len(), 15);
        for w in SYNC_BUCKETS.windows(2) {
            assert!((w[1] / w[0] - 2.0).abs() < 1e-9);
        }

        assert_eq!(s["weft_services_programmed"], 12.0);
        assert_eq!(s["weft_endpoints_programmed"], 34.0);
        assert_eq!(s["weft_sync_errors_total{dataplane=\"iptables\"}"], 2.0);
        assert_eq!(s["weft_sync_errors_total{dataplane=\"ebpf\"}"], 1.0);
        assert_eq!(s["weft_full_resyncs_total{reason=\"reset\"}"], 1.0);
        assert_eq!(
            s["weft_full_resyncs_total{reason=\"we\\\"ird\\\\\\n\"}"],
            1.0
        );
        assert_eq!(s["weft_conntrack_entries_deleted_total"], 7.0);
        assert_eq!(s["weft_view_revision"], 99.0);
        assert_eq!(s["weft_last_sync_timestamp_seconds"], 1_700_000_300.0);
        assert!(text.contains("# TYPE weft_sync_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE weft_sync_errors_total counter\n"));
        assert!(text.contains("# TYPE weft_view_revision gauge\n"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn health_transitions() {
        let bound = Duration::from_secs(60);
        let h = Health::started_at(bound, at(1000));
        let code = |t| h.status(at(t)).0;

        // Fresh, nothing queued.
        let (c, body) = h.status(at(1010));
        assert_eq!(c, 200);
        assert_eq!(body["lastUpdated"], serde_json::Value::Null);
        assert_eq!(body["pendingSince"], serde_json::Value::Null);
        assert_eq!(body["currentTime"], "1970-01-01T00:16:50Z");
        assert_eq!(body["nodeEligible"], true);

        h.applied(at(1020));
        assert_eq!(code(5000), 200, "idle long after a sync is healthy");

        h.queued(at(5000));
        h.queued(at(5050)); // the oldest pending update counts
        assert_eq!(code(5059), 200, "young pending update");
        let (c, body) = h.status(at(5060));
        assert_eq!(c, 503, "pending for the whole bound");
        assert_eq!(body["lastUpdated"], rfc3339(at(1020)));
        assert_eq!(body["pendingSince"], rfc3339(at(5000)));
        assert_eq!(body["currentTime"], rfc3339(at(5060)));
        assert!(!h.healthy(at(5060)));

        h.applied(at(5070));
        let (c, body) = h.status(at(5071));
        assert_eq!(c, 200);
        assert_eq!(body["lastUpdated"], rfc3339(at(5070)));
        assert_eq!(body["pendingSince"], serde_json::Value::Null);

        // A new update starts a new deadline.
        h.queued(at(6000));
        assert_eq!(code(6059), 200);
        assert_eq!(code(6060), 503);

        // A clock stepping back is not a late update.
        assert_eq!(code(10), 200);
    }

    #[test]
    fn health_before_the_first_sync() {
        let bound = Duration::from_secs(60);
        let h = Health::started_at(bound, at(1000));
        assert_eq!(h.status(at(1059)).0, 200);
        assert_eq!(h.status(at(1060)).0, 503, "never synced, bound passed");
        h.queued(at(1100));
        assert_eq!(h.status(at(1101)).0, 503, "still never synced");
        h.applied(at(1102));
        assert_eq!(h.status(at(1103)).0, 200);
    }

    #[test]
    fn node_eligibility_is_healthz_only() {
        let h = Health::started_at(Duration::from_secs(60), at(0));
        h.applied(at(1));
        h.set_node_eligible(false);
        let (c, body) = h.status(at(2));
        assert_eq!(c, 503);
        assert_eq!(body["nodeEligible"], false);
        assert!(h.healthy(at(2)));
        h.set_node_eligible(true);
        assert_eq!(h.status(at(2)).0, 200);
    }

    struct Reply {
        code: u16,
        headers: BTreeMap<String, String>,
        body: String,
    }

    /// One HTTP/1.1 exchange on a fresh connection.
    async fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Reply> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        let raw = String::from_utf8(raw).expect("utf-8 reply");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
        let mut lines = head.split("\r\n");
        let code = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        Ok(Reply {
            code,
            headers,
            body: body.to_string(),
        })
    }

    #[tokio::test]
    async fn serves_health_and_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::new(Duration::from_secs(3600)));
        let metrics = Arc::new(Metrics::new());
        metrics.set_revision(7);
        let server = tokio::spawn(serve(listener, health.clone(), metrics.clone()));

        let r = http(addr, "GET", "/healthz").await.unwrap();
        assert_eq!(r.code, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["nodeEligible"], true);
        assert!(body["currentTime"].as_str().unwrap().ends_with('Z'));

        // Unhealthy /healthz; /livez does not care.
        health.set_node_eligible(false);
        assert_eq!(
            http(addr, "GET", "/healthz?verbose").await.unwrap().code,
            503
        );
        let r = http(addr, "GET", "/livez").await.unwrap();
        assert_eq!((r.code, r.body.as_str()), (200, "ok"));

        let r = http(addr, "GET", "/metrics").await.unwrap();
        assert_eq!(r.code, 200);
        assert_eq!(r.headers["content-type"], "text/plain; version=0.0.4");
        assert_eq!(parse(&r.body)["weft_view_revision"], 7.0);

        let r = http(addr, "HEAD", "/livez").await.unwrap();
        assert_eq!((r.code, r.body.as_str()), (200, ""));
        assert_eq!(http(addr, "GET", "/nope").await.unwrap().code, 404);
        let r = http(addr, "POST", "/healthz").await.unwrap();
        assert_eq!(r.code, 405);
        assert_eq!(r.headers["allow"], "GET, HEAD");

        server.abort();
    }

    /// A port free on 127.0.0.1 a moment ago and never handed out before in
    /// this process, so tests running in parallel do not pick the same one.
    fn free_port() -> u16 {
        static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if GIVEN.lock().unwrap().insert(port) {
                return port;
            }
        }
    }

    fn svc(name: &str, ready: usize, terminating: usize) -> ServiceHealthState {
        ServiceHealthState {
            namespace: "default".into(),
            name: name.into(),
            local_endpoints: ready,
            local_serving_terminating: terminating,
        }
    }

    fn loopback() -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }

    #[tokio::test]
    async fn service_health_ports_follow_sync() {
        let (p1, p2) = (free_port(), free_port());
        let a1 = SocketAddr::new(loopback(), p1);
        let a2 = SocketAddr::new(loopback(), p2);
        let mut sh = ServiceHealth::new(vec![loopback()]);

        let errors = sh
            .sync(BTreeMap::from([
                (p1, svc("web", 2, 0)),
                (p2, svc("db", 1, 0)),
            ]))
            .await;
        assert!(errors.is_empty(), "{errors:?}");
        let mut ports = vec![p1, p2];
        ports.sort();
        assert_eq!(sh.ports(), ports);

        let r = http(a1, "GET", "/any/path").await.unwrap();
        assert_eq!(r.code, 200);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2, "serviceProxyHealthy": true})
        );

        // Only terminating endpoints left: 503, same listener.
        let errors = sh
            .sync(BTreeMap::from([
                (p1, svc("web", 0, 1)),
                (p2, svc("db", 1, 0)),
            ]))
            .await;
        assert!(errors.is_empty(), "{errors:?}");
        let r = http(a1, "GET", "/").await.unwrap();
        assert_eq!(r.code, 503);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["localEndpoints"], 0);
        assert_eq!(http(a2, "GET", "/").await.unwrap().code, 200);

        // A removed port refuses connections once sync returns.
        let errors = sh.sync(BTreeMap::from([(p2, svc("db", 1, 0))])).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(sh.ports(), vec![p2]);
        let refused = tokio::net::TcpStream::connect(a1).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(http(a2, "GET", "/").await.unwrap().code, 200);

        let errors = sh.sync(BTreeMap::new()).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert!(sh.ports().is_empty());
        assert!(tokio::net::TcpStream::connect(a2).await.is_err());
    }

    #[tokio::test]
    async fn service_health_bind_failure_is_per_port_and_retried() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = squatter.local_addr().unwrap().port();
        let free = free_port();
        let mut sh = ServiceHealth::new(vec![loopback()]);
        let want = BTreeMap::from([(busy, svc("lb", 1, 0)), (free, svc("web", 1, 0))]);

        let errors = sh.sync(want.clone()).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let msg = errors[0].to_string();
        assert!(msg.contains(&format!("127.0.0.1:{busy}")), "{msg}");
        assert!(msg.contains("default/lb"), "{msg}");
        assert!(matches!(&errors[0], ServiceHealthError::Bind { port, .. } if *port == busy));
        assert_eq!(sh.ports(), vec![free]);
        let free_addr = SocketAddr::new(loopback(), free);
        assert_eq!(http(free_addr, "GET", "/").await.unwrap().code, 200);

        drop(squatter);
        let errors = sh.sync(want).await;
        assert!(errors.is_empty(), "{errors:?}");
        let r = http(SocketAddr::new(loopback(), busy), "GET", "/")
            .await
            .unwrap();
        assert_eq!(r.code, 200);
        assert!(r.body.contains("\"lb\""));

        let errors = sh.sync(BTreeMap::from([(0, svc("zero", 1, 0))])).await;
        assert!(matches!(&errors[..], [ServiceHealthError::ZeroPort { .. }]));
    }

    #[tokio::test]
    async fn service_health_follows_proxy_health() {
        let port = free_port();
        let health = Arc::new(Health::started_at(Duration::from_secs(60), at(0)));
        let mut sh = ServiceHealth::new(vec![loopback()]).with_proxy_health(health.clone());
        // at(0) is long ago and nothing was ever applied: unhealthy proxy.
        let errors = sh.sync(BTreeMap::from([(port, svc("web", 3, 0))])).await;
        assert!(errors.is_empty(), "{errors:?}");
        let addr = SocketAddr::new(loopback(), port);
        let r = http(addr, "GET", "/").await.unwrap();
        assert_eq!(r.code, 503);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["serviceProxyHealthy"], false);
        assert_eq!(body["localEndpoints"], 3);

        health.applied(SystemTime::now());
        assert_eq!(http(addr, "GET", "/").await.unwrap().code, 200);
    }
}
