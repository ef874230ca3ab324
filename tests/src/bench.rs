//! Helpers of the push-stream benchmark (`weft-push-bench`): a keep-alive
//! HTTP/1.1 client, the simulated agents' state; and of every benchmark:
//! statistics, `/proc` readers, the source revision for reports. Kept out of
//! the harness proper so tests do not depend on them.

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use weft_model::view::{
    Backend, FrontendPort, NodeEntry, PodEntry, Protocol, ServiceEntry, ServiceType,
};
use weft_model::{NodeView, StreamFrame};

// ---------------------------------------------------------------- HTTP client

/// One keep-alive HTTP/1.1 connection to the control plane (reconnects when
/// the server closed it). `weft_agent::client::Endpoint::send` opens a fresh
/// connection per request; the load phase wants connection reuse.
pub struct Conn {
    authority: String,
    token: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Connections opened (1 + reconnects).
    pub connects: u64,
}

impl Conn {
    pub fn new(authority: &str, token: &str) -> Conn {
        Conn {
            authority: authority.to_string(),
            token: token.to_string(),
            sender: None,
            connects: 0,
        }
    }

    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        let usable = match self.sender.as_mut() {
            Some(s) => !s.is_closed() && s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let stream = TcpStream::connect(&self.authority)
                .await
                .with_context(|| format!("connecting to {}", self.authority))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .context("HTTP handshake")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.connects += 1;
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just set"))
    }

    async fn once(
        &mut self,
        method: &Method,
        path: &str,
        body: &Option<Bytes>,
    ) -> Result<(u16, Bytes), (bool, anyhow::Error)> {
        let authority = self.authority.clone();
        let token = self.token.clone();
        let sender = self.sender().await.map_err(|e| (false, e))?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, authority)
            .header(AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.clone().unwrap_or_default()))
            .map_err(|e| (false, anyhow!(e)))?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                // Retrying is safe only if the request never reached the server.
                return Err((e.is_canceled(), anyhow!(e)));
            }
        };
        let code = resp.status().as_u16();
        let bytes = match resp.into_body().collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                self.sender = None;
                return Err((false, anyhow!(e)));
            }
        };
        Ok((code, bytes))
    }

    /// Send a request and read the whole response; `(status, body)`.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(u16, Bytes)> {
        match self.once(&method, path, &body).await {
            Ok(r) => Ok(r),
            Err((retry, e)) => {
                // GET and PUT (with resourceVersion) are safe to repeat; a
                // request the server never saw is always safe.
                if retry || method == Method::GET || method == Method::PUT {
                    self.once(&method, path, &body).await.map_err(|(_, e2)| {
                        e2.context(format!("{method} {path} (retried after: {e:#})"))
                    })
                } else {
                    Err(e.context(format!("{method} {path}")))
                }
            }
        }
    }

    /// Like [`Conn::request`] but a non-2xx status is an error.
    pub async fn ok(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<Bytes> {
        let (code, bytes) = self.request(method.clone(), path, body).await?;
        if !(200..300).contains(&code) {
            bail!(
                "{method} {path}: HTTP {code}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(400)])
            );
        }
        Ok(bytes)
    }
}

/// Timings of reading one Reset frame with a reader that scans only new bytes
/// for the newline (to separate transport and server time from client parsing).
pub struct RawSnapshot {
    pub headers: Duration,
    pub first_byte: Duration,
    pub line: Duration,
    pub bytes: usize,
    pub chunks: usize,
}

/// `GET path` on a fresh connection and read up to the first `\n`.
pub async fn raw_first_line(
    authority: &str,
    token: &str,
    path: &str,
) -> anyhow::Result<(RawSnapshot, Bytes)> {
    let t0 = Instant::now();
    let stream = TcpStream::connect(authority).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(HOST, authority)
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let headers = t0.elapsed();
    if resp.status() != 200 {
        bail!("GET {path}: HTTP {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut first_byte = None;
    let mut chunks = 0;
    loop {
        let frame = body
            .frame()
            .await
            .ok_or_else(|| anyhow!("stream ended before the first frame"))??;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        first_byte.get_or_insert_with(|| t0.elapsed());
        chunks += 1;
        if std::env::var_os("PB_DEBUG").is_some() && chunks <= 6 {
            eprintln!(
                "DEBUG frame {chunks} at {:?} len {}",
                t0.elapsed(),
                data.len()
            );
        }
        let start = buf.len();
        buf.extend_from_slice(&data);
        if let Some(p) = buf[start..].iter().position(|b| *b == b'\n') {
            let line = buf.split_to(start + p).freeze();
            let out = RawSnapshot {
                headers,
                first_byte: first_byte.unwrap_or_default(),
                line: t0.elapsed(),
                bytes: line.len() + 1,
                chunks,
            };
            drop(body);
            drop(sender);
            conn.abort();
            return Ok((out, line));
        }
    }
}

// ---------------------------------------------------------------- agents' state

/// What a simulated agent holds.
pub enum Held {
    /// The real thing: `weft_model::NodeView`, as `weft_agent::sync::follow` keeps it.
    Full(NodeView),
    /// Per Service and Node: a 64-bit hash of the decoded entry (see [`HashedView`]).
    Hashed(HashedView),
}

impl Held {
    pub fn apply(&mut self, frame: StreamFrame) -> anyhow::Result<()> {
        match self {
            Held::Full(v) => v.apply(frame).map_err(|e| anyhow!(e)),
            Held::Hashed(v) => v.apply(frame),
        }
    }

    pub fn rev(&self) -> u64 {
        match self {
            Held::Full(v) => v.rev,
            Held::Hashed(v) => v.rev,
        }
    }

    pub fn services(&self) -> usize {
        match self {
            Held::Full(v) => v.services.len(),
            Held::Hashed(v) => v.services.len(),
        }
    }
}

/// A view that keeps, per entry, a hash of the decoded entry instead of the
/// entry (1,000 full views of 10k Services do not fit in memory). Frames are
/// applied by the same `weft_model::view::apply` as `NodeView`'s, on the fully
/// decoded frame.
#[derive(Default)]
pub struct HashedView {
    pub rev: u64,
    pub synced: bool,
    pub services: HashMap<(String, String), u64>,
    pub nodes: HashMap<String, u64>,
    pub pods: HashMap<(String, String), u64>,
}

impl HashedView {
    pub fn apply(&mut self, frame: StreamFrame) -> anyhow::Result<()> {
        Ok(weft_model::view::apply(self, frame)?)
    }
}

impl weft_model::view::ViewStore for HashedView {
    fn rev(&self) -> u64 {
        self.rev
    }
    fn synced(&self) -> bool {
        self.synced
    }
    fn set_rev(&mut self, rev: u64) {
        self.rev = rev;
    }
    fn reset(&mut self, services: Vec<ServiceEntry>, nodes: Vec<NodeEntry>, pods: Vec<PodEntry>) {
        self.synced = true;
        self.services = services
            .into_iter()
            .map(|s| {
                let h = hash_service(&s);
                ((s.namespace, s.name), h)
            })
            .collect();
        self.nodes = nodes
            .into_iter()
            .map(|n| {
                let h = hash_node(&n);
                (n.name, h)
            })
            .collect();
        self.pods = pods
            .into_iter()
            .map(|p| {
                let h = hash_pod(&p);
                ((p.namespace, p.name), h)
            })
            .collect();
    }
    fn put_service(&mut self, service: ServiceEntry) {
        let h = hash_service(&service);
        self.services.insert((service.namespace, service.name), h);
    }
    fn remove_service(&mut self, namespace: String, name: String) {
        self.services.remove(&(namespace, name));
    }
    fn put_node(&mut self, node: NodeEntry) {
        let h = hash_node(&node);
        self.nodes.insert(node.name, h);
    }
    fn remove_node(&mut self, name: String) {
        self.nodes.remove(&name);
    }
    fn put_pod(&mut self, pod: PodEntry) {
        let h = hash_pod(&pod);
        self.pods.insert((pod.namespace, pod.name), h);
    }
    fn remove_pod(&mut self, namespace: String, name: String) {
        self.pods.remove(&(namespace, name));
    }
}

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::TCP => 0,
        Protocol::UDP => 1,
        Protocol::SCTP => 2,
    }
}

/// Hash of every field of a Service entry (destructured so a new field fails to compile).
pub fn hash_service(e: &ServiceEntry) -> u64 {
    let ServiceEntry {
        namespace,
        name,
        service_type,
        cluster_ips,
        headless,
        external_name,
        ports,
        external_ips,
        load_balancer_ips,
        affinity_timeout,
        external_local,
        internal_local,
        health_check_node_port,
        publish_not_ready,
        proxied,
        options,
        backends,
    } = e;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    namespace.hash(&mut h);
    name.hash(&mut h);
    (match service_type {
        ServiceType::ClusterIP => 0u8,
        ServiceType::NodePort => 1,
        ServiceType::LoadBalancer => 2,
        ServiceType::ExternalName => 3,
    })
    .hash(&mut h);
    cluster_ips.hash(&mut h);
    headless.hash(&mut h);
    external_name.hash(&mut h);
    ports.len().hash(&mut h);
    for FrontendPort {
        name,
        protocol,
        port,
        node_port,
    } in ports
    {
        name.hash(&mut h);
        proto(*protocol).hash(&mut h);
        port.hash(&mut h);
        node_port.hash(&mut h);
    }
    external_ips.hash(&mut h);
    load_balancer_ips.hash(&mut h);
    affinity_timeout.hash(&mut h);
    external_local.hash(&mut h);
    internal_local.hash(&mut h);
    health_check_node_port.hash(&mut h);
    publish_not_ready.hash(&mut h);
    proxied.hash(&mut h);
    options.hash(&mut h);
    backends.len().hash(&mut h);
    for Backend {
        ip,
        node,
        hostname,
        target,
        zone,
        ports,
        ready,
        serving,
        terminating,
    } in backends
    {
        ip.hash(&mut h);
        node.hash(&mut h);
        hostname.hash(&mut h);
        target.hash(&mut h);
        zone.hash(&mut h);
        ports.len().hash(&mut h);
        for p in ports {
            p.name.hash(&mut h);
            proto(p.protocol).hash(&mut h);
            p.port.hash(&mut h);
        }
        ready.hash(&mut h);
        serving.hash(&mut h);
        terminating.hash(&mut h);
    }
    h.finish()
}

pub fn hash_node(n: &NodeEntry) -> u64 {
    let NodeEntry {
        name,
        node_ip,
        pod_cidrs,
        vtep_ip,
        vtep_mac,
        ready,
    } = n;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    node_ip.hash(&mut h);
    pod_cidrs.hash(&mut h);
    vtep_ip.hash(&mut h);
    vtep_mac.hash(&mut h);
    ready.hash(&mut h);
    h.finish()
}

pub fn hash_pod(p: &PodEntry) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}

// ---------------------------------------------------------------- objects

pub const NAMESPACE: &str = "bench";

pub fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

pub fn slice_name(i: usize) -> String {
    format!("svc-{i:05}-bench")
}

/// A selector-less ClusterIP Service with one TCP port.
pub fn service_body(i: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service_name(i), "namespace": NAMESPACE},
            "spec": {
                "type": "ClusterIP",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
            }
        })
        .to_string(),
    )
}

/// Endpoint address number `k` in 198.18.128.0/17 (wraps after 128*250 addresses).
pub fn endpoint_ip(k: usize) -> String {
    let k = k % (128 * 250);
    format!("198.18.{}.{}", 128 + k / 250, k % 250 + 1)
}

/// The EndpointSlice of Service `i` with `e` ready endpoints.
pub fn slice_body(i: usize, e: usize) -> Bytes {
    let endpoints: Vec<serde_json::Value> = (0..e)
        .map(|j| {
            serde_json::json!({
                "addresses": [endpoint_ip(i * e + j)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", i % 3 + 1),
            })
        })
        .collect();
    Bytes::from(
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": slice_name(i),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": service_name(i)}
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
        .to_string(),
    )
}

// ---------------------------------------------------------------- statistics

/// Nearest-rank percentile of sorted values (`q` in 0..=1).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------- /proc

/// A `kB` field of `/proc/<pid>/status` (`pid` may be "self"), in bytes.
pub fn proc_status_bytes(pid: &str, key: &str) -> Option<u64> {
    proc_kb_field(pid, "status", key)
}

/// A `Key: N kB` field of a file under `/proc/<pid>/` (`status`,
/// `smaps_rollup`), in bytes.
pub fn proc_kb_field(pid: &str, file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// User + system CPU seconds of a process (USER_HZ = 100).
pub fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / 100.0)
}

/// Memory and CPU of the control plane and of this process at one moment.
#[derive(Clone, Debug, Default)]
pub struct ProcSample {
    pub control_rss: u64,
    pub control_hwm: u64,
    pub control_cpu: f64,
    pub self_rss: u64,
    pub self_hwm: u64,
    pub self_cpu: f64,
}

pub fn sample(control_pid: &str) -> ProcSample {
    ProcSample {
        control_rss: proc_status_bytes(control_pid, "VmRSS").unwrap_or(0),
        control_hwm: proc_status_bytes(control_pid, "VmHWM").unwrap_or(0),
        control_cpu: proc_cpu_secs(control_pid).unwrap_or(f64::NAN),
        self_rss: proc_status_bytes("self", "VmRSS").unwrap_or(0),
        self_hwm: proc_status_bytes("self", "VmHWM").unwrap_or(0),
        self_cpu: proc_cpu_secs("self").unwrap_or(f64::NAN),
    }
}

/// A `name value` line of the Prometheus text at `/metrics`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------- reports

/// For a report: the commit the working tree is at (short hash, date,
/// subject; backticks replaced, so it fits a code span) and whether the
/// sources in `dirs` differ from it (all of the tree when `dirs` is empty).
/// Read at run time, from the current directory.
pub fn source_revision(dirs: &[&str]) -> String {
    let head: String = crate::benchnet::run("git", &["log", "-1", "--format=%h %cI %s"])
        .map(|s| s.trim().replace('`', "'").chars().take(100).collect())
        .unwrap_or_else(|_| "unknown (not a git checkout)".into());
    let mut status = vec!["status", "--porcelain", "--"];
    status.extend_from_slice(dirs);
    let dirty = crate::benchnet::run("git", &status).is_ok_and(|s| !s.trim().is_empty());
    if dirty {
        format!("working tree at `{head}`, {}", changes_in(dirs))
    } else {
        format!("working tree at `{head}`")
    }
}

/// "with uncommitted changes in a/, b/ or c/".
fn changes_in(dirs: &[&str]) -> String {
    let dirs: Vec<String> = dirs.iter().map(|d| format!("{d}/")).collect();
    match dirs.split_last() {
        None => "with uncommitted changes".into(),
        Some((last, [])) => format!("with uncommitted changes in {last}"),
        Some((last, rest)) => format!("with uncommitted changes in {} or {last}", rest.join(", ")),
    }
}

/// A tiny deterministic RNG (xorshift64*), so runs pick the same Services.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = sorted((1..=100).map(|x| x as f64).collect());
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn names_the_changed_directories() {
        assert_eq!(changes_in(&[]), "with uncommitted changes");
        assert_eq!(changes_in(&["dns"]), "with uncommitted changes in dns/");
        assert_eq!(
            changes_in(&["agent", "model", "ebpf"]),
            "with uncommitted changes in agent/, model/ or ebpf/"
        );
    }

    #[test]
    fn endpoint_ips_stay_in_range() {
        for k in [0, 249, 250, 31_999, 32_000, 99_999] {
            let ip: std::net::Ipv4Addr = endpoint_ip(k).parse().unwrap();
            let o = ip.octets();
            assert_eq!((o[0], o[1]), (198, 18));
            assert!(o[2] >= 128 && o[3] >= 1 && o[3] <= 250, "{ip}");
        }
    }
}
