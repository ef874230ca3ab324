//! weft-push-bench: fan-out latency, snapshot time, bytes per update and
//! memory of the per-node push stream, against a real weft-control process.
//!
//! Phases:
//! 1. start weft-control (release binary next to this one) on loopback;
//! 2. load N selector-less Services with one EndpointSlice of E endpoints each
//!    (bounded concurrency over keep-alive connections);
//! 3. measure one view (Reset size, decode time, heap of a `NodeView`);
//! 4. connect A simulated agents, each a tokio task on one 2-worker runtime
//!    that opens `weft_agent::sync::Stream`, decodes every frame with
//!    `StreamFrame::decode` and applies it to the state it holds;
//! 5. time a new agent's snapshot (Reset) with the A agents connected;
//! 6. U updates, one at a time: PUT one EndpointSlice with one endpoint's
//!    `ready` flipped, and time from the PUT's response to the moment the
//!    A-th agent has applied the delta;
//! 7. snapshots again, each right after a write (the control plane must
//!    re-encode the Reset), then peak RSS from /proc.
//!
//! Run by `cargo xtask bench push`; `--help` for the knobs.

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Parser;
use hyper::Method;
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use weft_agent::client::Endpoint;
use weft_agent::sync::Stream;
use weft_e2e::bench::{
    mib, ms, percentile, raw_first_line, sample, service_body, slice_body, slice_name, sorted,
    Conn, HashedView, Held, ProcSample, Rng, NAMESPACE,
};
use weft_e2e::{ControlProcess, TempDir, ADMIN_TOKEN};
use weft_model::{NodeView, StreamFrame};

// ---------------------------------------------------------------- heap accounting

/// The system allocator, counting live bytes while `COUNTING` is on (only
/// during the single-view measurement, so the rest of the run pays one
/// relaxed load per allocation).
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------- arguments

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum HoldMode {
    /// Full `NodeView`s if A x (measured view size) fits the budget, else hashed.
    Auto,
    /// Every agent keeps a full `weft_model::NodeView`.
    Full,
    /// Every agent keeps a 64-bit hash per decoded entry.
    Hashed,
}

#[derive(Parser, Debug)]
#[command(
    name = "weft-push-bench",
    about = "Benchmark of weft's per-node push stream: fan-out to many agents, snapshot time, bytes, memory"
)]
struct Args {
    /// Services to create (each selector-less, with one EndpointSlice).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Simulated agents (stream subscribers) in this process.
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Timed updates (one EndpointSlice write each, one at a time).
    #[arg(long, default_value_t = 100)]
    updates: usize,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Writes in flight while loading (one keep-alive connection each).
    #[arg(long, default_value_t = 64)]
    load_concurrency: usize,
    /// Agents reading their initial Reset at the same time.
    #[arg(long, default_value_t = 4)]
    connect_concurrency: usize,
    /// Snapshot measurements per kind (warm cache / right after a write).
    #[arg(long, default_value_t = 10)]
    snapshots: usize,
    /// What each agent holds.
    #[arg(long, value_enum, default_value = "auto")]
    hold: HoldMode,
    /// Memory budget for full views in `--hold auto`, MiB.
    #[arg(long, default_value_t = 8192)]
    full_view_budget_mib: u64,
    /// After its Reset, an agent reopens its stream with `?since=REV` (see the
    /// report). Default: only if the stream's buffer, measured after one Reset,
    /// would keep more than 1 GiB across all agents.
    #[arg(long, action = clap::ArgAction::Set)]
    reopen_after_reset: Option<bool>,
    /// Seconds to wait for all agents to hold one update before counting a timeout.
    #[arg(long, default_value_t = 10)]
    update_timeout_secs: u64,
    /// Seed of the Service picker.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `--stream-history` of the control plane.
    #[arg(long, default_value_t = 20_000)]
    stream_history: usize,
}

// ---------------------------------------------------------------- agents

enum Msg {
    /// The agent holds its Reset (and, with reopening, has its resumed stream open).
    Ready {
        agent: usize,
        took: Duration,
        rev: u64,
        services: usize,
    },
    /// The agent decoded and applied a Delta (or an unexpected Reset).
    Applied {
        agent: usize,
        rev: u64,
        at: Instant,
        bytes: usize,
        reset: bool,
    },
    Died {
        agent: usize,
        reason: String,
    },
}

struct AgentCfg {
    ep: Endpoint,
    full: bool,
    reopen: bool,
    gate: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Msg>,
    pings: Arc<AtomicUsize>,
}

async fn agent(i: usize, cfg: Arc<AgentCfg>) {
    if let Err(e) = agent_run(i, &cfg).await {
        let _ = cfg.tx.send(Msg::Died {
            agent: i,
            reason: format!("{e:#}"),
        });
    }
}

async fn agent_run(i: usize, cfg: &AgentCfg) -> anyhow::Result<()> {
    let node = format!("node-{}", i % 3 + 1);
    let permit = cfg.gate.acquire().await?;
    let t = Instant::now();
    let mut stream = Stream::open(&cfg.ep, &node, None).await?;
    let line = stream
        .next_raw()
        .await?
        .ok_or_else(|| anyhow!("stream closed before the Reset"))?;
    let frame = StreamFrame::decode(&line)?;
    if !matches!(frame, StreamFrame::Reset { .. }) {
        bail!("first frame is not a Reset");
    }
    let mut held = if cfg.full {
        Held::Full(NodeView::default())
    } else {
        Held::Hashed(HashedView::default())
    };
    held.apply(frame)?;
    drop(line);
    if cfg.reopen {
        // The stream's line buffer keeps the Reset's allocation for the life of
        // the stream; resuming on a fresh stream frees it (see the report).
        drop(stream);
        stream = Stream::open(&cfg.ep, &node, Some(held.rev())).await?;
    }
    let took = t.elapsed();
    drop(permit);
    let _ = cfg.tx.send(Msg::Ready {
        agent: i,
        took,
        rev: held.rev(),
        services: held.services(),
    });
    loop {
        let Some(line) = stream.next_raw().await? else {
            bail!("stream closed by the control plane");
        };
        let bytes = line.len() + 1;
        let frame = StreamFrame::decode(&line)?;
        let (rev, kind) = match &frame {
            StreamFrame::Ping { .. } => {
                cfg.pings.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            StreamFrame::Reset { rev, .. } => (*rev, true),
            StreamFrame::Delta { rev, .. } => (*rev, false),
        };
        held.apply(frame)?;
        let at = Instant::now();
        let _ = cfg.tx.send(Msg::Applied {
            agent: i,
            rev,
            at,
            bytes,
            reset: kind,
        });
    }
}

/// The driver's view of the fleet.
struct Fleet {
    rx: mpsc::UnboundedReceiver<Msg>,
    held: Vec<u64>,
    alive: Vec<bool>,
    alive_count: usize,
    died: Vec<(usize, String)>,
    /// Resets received after the initial one (the control plane thought the agent lagged).
    late_resets: u64,
}

struct Arrival {
    at: Instant,
    bytes: usize,
    crossed: bool,
}

impl Fleet {
    fn handle(&mut self, m: Msg, target: u64) -> Option<Arrival> {
        match m {
            Msg::Ready { agent, rev, .. } => {
                self.held[agent] = rev;
                None
            }
            Msg::Died { agent, reason } => {
                if self.alive[agent] {
                    self.alive[agent] = false;
                    self.alive_count -= 1;
                }
                self.died.push((agent, reason));
                None
            }
            Msg::Applied {
                agent,
                rev,
                at,
                bytes,
                reset,
            } => {
                if reset {
                    self.late_resets += 1;
                }
                let before = self.held[agent];
                self.held[agent] = before.max(rev);
                Some(Arrival {
                    at,
                    bytes,
                    crossed: target > 0 && before < target && rev >= target,
                })
            }
        }
    }

    fn drain(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.handle(m, 0);
        }
    }
}

struct UpdateResult {
    rev: u64,
    put_rtt: f64,
    /// PUT response -> A-th agent applied, ms (None: timed out).
    last: Option<f64>,
    first: f64,
    /// PUT request sent -> A-th agent applied, ms.
    last_from_send: Option<f64>,
    reached: usize,
    needed: usize,
    early: usize,
    per_agent: Vec<f64>,
    bytes_sum: usize,
}

/// One timed update: flip `ready` of one endpoint of Service `svc`'s slice.
async fn update(
    fleet: &mut Fleet,
    conn: &mut Conn,
    svc: usize,
    endpoint: usize,
    timeout: Duration,
) -> anyhow::Result<UpdateResult> {
    let path = format!(
        "/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices/{}",
        slice_name(svc)
    );
    let body = conn.ok(Method::GET, &path, None).await?;
    let mut v: serde_json::Value = serde_json::from_slice(&body)?;
    let cond = v
        .pointer_mut(&format!("/endpoints/{endpoint}/conditions/ready"))
        .ok_or_else(|| anyhow!("{path}: no endpoint {endpoint}"))?;
    let cur = cond.as_bool().unwrap_or(true);
    *cond = serde_json::Value::Bool(!cur);
    let out = Bytes::from(v.to_string());
    fleet.drain();
    let ts = Instant::now();
    let resp = conn.ok(Method::PUT, &path, Some(out)).await?;
    let t0 = Instant::now();
    let rv: u64 = serde_json::from_slice::<serde_json::Value>(&resp)?
        .pointer("/metadata/resourceVersion")
        .and_then(|r| r.as_str())
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| anyhow!("PUT {path}: no resourceVersion in the answer"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut arrivals = Vec::with_capacity(fleet.alive_count);
    let mut bytes_sum = 0;
    let mut timed_out = false;
    while arrivals.len() < fleet.alive_count {
        match tokio::time::timeout_at(deadline, fleet.rx.recv()).await {
            Err(_) => {
                timed_out = true;
                break;
            }
            Ok(None) => bail!("every agent task is gone"),
            Ok(Some(m)) => {
                if let Some(a) = fleet.handle(m, rv) {
                    if a.crossed {
                        arrivals.push(a.at);
                        bytes_sum += a.bytes;
                    }
                }
            }
        }
    }
    let rel = |at: Instant| ms(at.saturating_duration_since(t0));
    let early = arrivals.iter().filter(|a| **a < t0).count();
    let last_at = arrivals.iter().max().copied();
    let first_at = arrivals.iter().min().copied();
    Ok(UpdateResult {
        rev: rv,
        put_rtt: ms(t0 - ts),
        last: if timed_out { None } else { last_at.map(rel) },
        first: first_at.map(rel).unwrap_or(f64::NAN),
        last_from_send: if timed_out {
            None
        } else {
            last_at.map(|a| ms(a.saturating_duration_since(ts)))
        },
        reached: arrivals.len(),
        needed: fleet.alive_count,
        early,
        per_agent: arrivals.iter().map(|a| rel(*a)).collect(),
        bytes_sum,
    })
}

// ---------------------------------------------------------------- snapshots

struct SnapTiming {
    headers: f64,
    line: f64,
    decoded: f64,
    applied: f64,
    bytes: usize,
}

/// Let the previous probe's connection task finish tearing down (it runs on
/// the same single-threaded driver runtime and would otherwise be timed as
/// part of the next probe).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// A new agent's snapshot with `weft_agent::sync::Stream`: request start to a decoded and applied Reset.
async fn snapshot(ep: &Endpoint) -> anyhow::Result<SnapTiming> {
    let t = Instant::now();
    let mut s = Stream::open(ep, "node-1", None).await?;
    let headers = ms(t.elapsed());
    let line = s
        .next_raw()
        .await?
        .ok_or_else(|| anyhow!("stream closed before the Reset"))?;
    let line_t = ms(t.elapsed());
    let frame = StreamFrame::decode(&line)?;
    let decoded = ms(t.elapsed());
    let mut view = NodeView::default();
    view.apply(frame)?;
    let applied = ms(t.elapsed());
    let bytes = line.len() + 1;
    drop(s);
    drop(line);
    drop(view);
    Ok(SnapTiming {
        headers,
        line: line_t,
        decoded,
        applied,
        bytes,
    })
}

/// Heap sizes of one view, measured with the counting allocator.
struct Sizes {
    full_view: i64,
    hashed_view: i64,
    decoded_frame: i64,
    reader_retained: i64,
    read_ms: f64,
    decode_ms: f64,
    apply_ms: f64,
    hashed_apply_ms: f64,
    clone_ms: f64,
    /// Heap of a clone (exact capacities).
    cloned_view: i64,
    services: usize,
    /// Best of 3: decode as StreamFrame / as Vec<ServiceEntry> / as serde_json::Value.
    frame_ms: f64,
    entries_ms: f64,
    value_ms: f64,
}

async fn measure_view(ep: &Endpoint) -> anyhow::Result<Sizes> {
    COUNTING.store(true, Ordering::SeqCst);
    let t = Instant::now();
    let mut s = Stream::open(ep, "node-1", None).await?;
    let line = s
        .next_raw()
        .await?
        .ok_or_else(|| anyhow!("stream closed before the Reset"))?;
    let read_ms = ms(t.elapsed());
    let copy = line.to_vec();
    let l0 = live();
    let t = Instant::now();
    let frame = StreamFrame::decode(&line)?;
    let decode_ms = ms(t.elapsed());
    let l1 = live();
    let t = Instant::now();
    let mut view = NodeView::default();
    view.apply(frame)?;
    let apply_ms = ms(t.elapsed());
    let services = view.services.len();
    // `weft_agent::sync::follow` publishes `Arc::new(view.clone())` after every frame.
    let before_clone = live();
    let t = Instant::now();
    let cloned = view.clone();
    let clone_ms = ms(t.elapsed());
    let cloned_view = live() - before_clone;
    drop(cloned);
    drop(line);
    let with_reader = live();
    drop(s);
    // Let the connection task notice the drop and free its buffers.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let with_view = live();
    drop(view);
    let without = live();
    let frame = StreamFrame::decode(&copy)?;
    let t = Instant::now();
    let mut hv = HashedView::default();
    hv.apply(frame)?;
    let hashed_apply_ms = ms(t.elapsed());
    // The frame was consumed by apply: what is left is the hashed view.
    let hashed_view = live() - without;
    drop(hv);
    COUNTING.store(false, Ordering::SeqCst);
    // Where decode time goes: the same bytes as StreamFrame (internally tagged
    // enum), as the untagged `Vec<ServiceEntry>` inside it, and as untyped JSON.
    let best = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let mut b = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            f()?;
            b = b.min(ms(t.elapsed()));
        }
        Ok(b)
    };
    let frame_ms = best(&|| {
        StreamFrame::decode(&copy)?;
        Ok(())
    })?;
    let text = std::str::from_utf8(&copy)?;
    let services_json = text
        .find("\"services\":")
        .zip(text.rfind(",\"nodes\":"))
        .map(|(a, b)| &text[a + "\"services\":".len()..b])
        .ok_or_else(|| anyhow!("Reset frame without services/nodes"))?;
    let entries_ms = best(&|| {
        serde_json::from_str::<Vec<weft_model::ServiceEntry>>(services_json)?;
        Ok(())
    })?;
    let value_ms = best(&|| {
        serde_json::from_slice::<serde_json::Value>(&copy)?;
        Ok(())
    })?;
    drop(copy);
    Ok(Sizes {
        frame_ms,
        entries_ms,
        value_ms,
        full_view: with_view - without,
        hashed_view,
        decoded_frame: l1 - l0,
        reader_retained: with_reader - with_view,
        read_ms,
        decode_ms,
        apply_ms,
        hashed_apply_ms,
        clone_ms,
        cloned_view,
        services,
    })
}

// ---------------------------------------------------------------- load

struct LoadStats {
    secs: f64,
    objects: usize,
    connections: u64,
    lat_p50: f64,
    lat_p99: f64,
}

async fn load(
    authority: &str,
    n: usize,
    e: usize,
    concurrency: usize,
) -> anyhow::Result<LoadStats> {
    let mut c = Conn::new(authority, ADMIN_TOKEN);
    c.ok(
        Method::POST,
        "/api/v1/namespaces",
        Some(Bytes::from(
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
                .to_string(),
        )),
    )
    .await?;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        let done = done.clone();
        let authority = authority.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::new(&authority, ADMIN_TOKEN);
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                c.ok(
                    Method::POST,
                    &format!("/api/v1/namespaces/{NAMESPACE}/services"),
                    Some(service_body(i)),
                )
                .await?;
                lat.push(ms(t.elapsed()));
                let t = Instant::now();
                c.ok(
                    Method::POST,
                    &format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"),
                    Some(slice_body(i, e)),
                )
                .await?;
                lat.push(ms(t.elapsed()));
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d.is_multiple_of(1000) {
                    eprintln!(
                        "  loaded {d}/{n} Services ({:.0} objects/s)",
                        2.0 * d as f64 / start.elapsed().as_secs_f64()
                    );
                }
            }
            Ok::<_, anyhow::Error>((lat, c.connects))
        }));
    }
    let mut lat = Vec::new();
    let mut connections = 0;
    for task in tasks {
        let (l, c) = task.await??;
        lat.extend(l);
        connections += c;
    }
    let secs = start.elapsed().as_secs_f64();
    let lat = sorted(lat);
    Ok(LoadStats {
        secs,
        objects: 2 * n,
        connections,
        lat_p50: percentile(&lat, 0.5),
        lat_p99: percentile(&lat, 0.99),
    })
}

// ---------------------------------------------------------------- main

fn main() {
    if let Err(e) = run() {
        eprintln!("weft-push-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let cmdline = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = weft_e2e::benchnet::machine();
    let loadavg_start = read_trim("/proc/loadavg");
    eprintln!("weft-push-bench: {machine}");
    eprintln!(
        "  N={} Services x E={} endpoints, A={} agents, U={} updates",
        args.services, args.endpoints, args.agents, args.updates
    );
    if args.services == 0 || args.endpoints == 0 || args.agents == 0 {
        bail!("--services, --endpoints and --agents must be positive");
    }
    let agent_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("agent")
        .build()?;
    let driver_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let dir = TempDir::new("push-bench");
    let history = args.stream_history.to_string();
    let control = ControlProcess::start(&dir.0, &["--stream-history", &history])?;
    let pid = control
        .pid()
        .context("control plane has no pid")?
        .to_string();
    let authority = control.addr.to_string();
    let ep = Endpoint::parse(&control.server(), ADMIN_TOKEN)?;
    let s_start = sample(&pid);
    eprintln!("  weft-control pid {pid} on {authority}");

    // ---- load
    eprintln!(
        "load: {} objects, {} in flight",
        2 * args.services,
        args.load_concurrency
    );
    let ld = agent_rt.block_on(load(
        &authority,
        args.services,
        args.endpoints,
        args.load_concurrency,
    ))?;
    let s_load = sample(&pid);
    eprintln!(
        "  {} objects in {:.1} s = {:.0} objects/s (request p50 {:.1} ms, p99 {:.1} ms, {} connections)",
        ld.objects,
        ld.secs,
        ld.objects as f64 / ld.secs,
        ld.lat_p50,
        ld.lat_p99,
        ld.connections
    );

    // ---- one view
    let sizes = driver_rt.block_on(measure_view(&ep))?;
    let first = driver_rt.block_on(snapshot(&ep))?;
    eprintln!(
        "view: Reset {:.1} MiB, {} services; read {:.0} ms, decode {:.0} ms, apply {:.0} ms; NodeView heap {:.1} MiB, hashed {:.2} MiB; stream buffer kept after the Reset {:.1} MiB",
        mib(first.bytes as f64),
        sizes.services,
        sizes.read_ms,
        sizes.decode_ms,
        sizes.apply_ms,
        mib(sizes.full_view as f64),
        mib(sizes.hashed_view as f64),
        mib(sizes.reader_retained as f64)
    );
    let full_total = sizes.full_view.max(0) as u64 * args.agents as u64;
    let full = match args.hold {
        HoldMode::Full => true,
        HoldMode::Hashed => false,
        HoldMode::Auto => full_total <= args.full_view_budget_mib << 20,
    };
    let hold_desc = if full {
        format!(
            "full `weft_model::NodeView` per agent ({:.1} MiB each, {:.0} MiB for {} agents)",
            mib(sizes.full_view as f64),
            mib(full_total as f64),
            args.agents
        )
    } else {
        format!(
            "hashed view per agent: (namespace, name) -> 64-bit hash of the decoded ServiceEntry ({:.2} MiB each); \
             full NodeViews would need {:.1} MiB x {} = {:.1} GiB",
            mib(sizes.hashed_view as f64),
            mib(sizes.full_view as f64),
            args.agents,
            full_total as f64 / (1u64 << 30) as f64
        )
    };
    eprintln!("  agents hold: {hold_desc}");
    let retained_total = sizes.reader_retained.max(0) as u64 * args.agents as u64;
    let reopen = args.reopen_after_reset.unwrap_or(retained_total > 1 << 30);
    eprintln!(
        "  stream buffer kept after the Reset: {:.1} MiB x {} agents; reopen after the Reset: {reopen}",
        mib(sizes.reader_retained as f64),
        args.agents
    );

    // ---- agents
    let (tx, rx) = mpsc::unbounded_channel();
    let pings = Arc::new(AtomicUsize::new(0));
    let cfg = Arc::new(AgentCfg {
        ep: ep.clone(),
        full,
        reopen,
        gate: Arc::new(Semaphore::new(args.connect_concurrency.max(1))),
        tx,
        pings: pings.clone(),
    });
    let mut fleet = Fleet {
        rx,
        held: vec![0; args.agents],
        alive: vec![true; args.agents],
        alive_count: args.agents,
        died: Vec::new(),
        late_resets: 0,
    };
    eprintln!(
        "connect: {} agents, {} reading a Reset at a time",
        args.agents, args.connect_concurrency
    );
    let t_connect = Instant::now();
    for i in 0..args.agents {
        agent_rt.spawn(agent(i, cfg.clone()));
    }
    drop(cfg);
    let mut connect_times = Vec::new();
    let mut ready_services = Vec::new();
    driver_rt.block_on(async {
        let mut seen = 0;
        while seen < args.agents {
            let m = fleet
                .rx
                .recv()
                .await
                .ok_or_else(|| anyhow!("agents gone"))?;
            match &m {
                Msg::Ready { took, services, .. } => {
                    connect_times.push(ms(*took));
                    ready_services.push(*services);
                    seen += 1;
                    if seen % 100 == 0 || seen == args.agents {
                        eprintln!(
                            "  {seen}/{} agents hold the view ({:.1} s)",
                            args.agents,
                            t_connect.elapsed().as_secs_f64()
                        );
                    }
                }
                Msg::Died { .. } => seen += 1,
                Msg::Applied { .. } => {}
            }
            fleet.handle(m, 0);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let s_connect = sample(&pid);
    if fleet.alive_count == 0 {
        bail!(
            "no agent connected: {}",
            fleet.died.first().map(|d| d.1.as_str()).unwrap_or("?")
        );
    }
    let bad_views = ready_services
        .iter()
        .filter(|s| **s != args.services)
        .count();
    let connect_sorted = sorted(connect_times.clone());

    // ---- snapshots with the agents connected (cached Reset)
    eprintln!("snapshot: {} new agents (warm)", args.snapshots);
    let mut warm = Vec::new();
    let mut raw = Vec::new();
    driver_rt.block_on(async {
        for _ in 0..args.snapshots {
            settle().await;
            warm.push(snapshot(&ep).await?);
            settle().await;
            raw.push(
                raw_first_line(&authority, ADMIN_TOKEN, "/weft/v1/nodes/node-1/stream")
                    .await?
                    .0,
            );
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let s_snap = sample(&pid);

    // ---- fan-out
    eprintln!("fan-out: {} updates", args.updates);
    let mut rng = Rng::new(args.seed);
    let mut conn = Conn::new(&authority, ADMIN_TOKEN);
    let timeout = Duration::from_secs(args.update_timeout_secs);
    let mut results = Vec::new();
    let t_fan = Instant::now();
    driver_rt.block_on(async {
        for u in 0..args.updates {
            let svc = rng.below(args.services);
            let e = rng.below(args.endpoints);
            let r = update(&mut fleet, &mut conn, svc, e, timeout).await?;
            if (u + 1) % 10 == 0 || r.last.is_none() {
                eprintln!(
                    "  update {}/{}: rev {} -> {}/{} agents, last {} ms, first {:.1} ms, PUT {:.1} ms",
                    u + 1,
                    args.updates,
                    r.rev,
                    r.reached,
                    r.needed,
                    r.last
                        .map(|l| format!("{l:.1}"))
                        .unwrap_or_else(|| "TIMEOUT".into()),
                    r.first,
                    r.put_rtt
                );
            }
            results.push(r);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let fan_secs = t_fan.elapsed().as_secs_f64();
    let s_fan = sample(&pid);

    // ---- snapshots right after a write (the Reset is re-encoded)
    eprintln!(
        "snapshot: {} new agents, each after a write",
        args.snapshots
    );
    let mut cold = Vec::new();
    let mut raw_cold = Vec::new();
    driver_rt.block_on(async {
        for _ in 0..args.snapshots {
            let svc = rng.below(args.services);
            let e = rng.below(args.endpoints);
            update(&mut fleet, &mut conn, svc, e, timeout).await?;
            settle().await;
            cold.push(snapshot(&ep).await?);
            let svc = rng.below(args.services);
            let e = rng.below(args.endpoints);
            update(&mut fleet, &mut conn, svc, e, timeout).await?;
            settle().await;
            raw_cold.push(
                raw_first_line(&authority, ADMIN_TOKEN, "/weft/v1/nodes/node-1/stream")
                    .await?
                    .0,
            );
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let s_end = sample(&pid);
    driver_rt.block_on(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    fleet.drain();
    let metrics = driver_rt
        .block_on(async { conn.ok(Method::GET, "/metrics", None).await })
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let log = std::fs::read_to_string(dir.0.join("control.log")).unwrap_or_default();
    let lagged_lines = log.matches("lagged").count();
    let log_errors = log.lines().filter(|l| l.contains("ERROR")).count();

    // ---- report
    let md = report(&Report {
        args: &args,
        loadavg_start: &loadavg_start,
        cmdline: &cmdline,
        machine: &machine,
        ld: &ld,
        sizes: &sizes,
        first_snapshot: &first,
        hold_desc: &hold_desc,
        full,
        reopen,
        connect_secs,
        connect_sorted: &connect_sorted,
        bad_views,
        warm: &warm,
        raw: &raw,
        cold: &cold,
        raw_cold: &raw_cold,
        results: &results,
        fan_secs,
        samples: [
            ("start", &s_start),
            ("loaded", &s_load),
            ("agents connected", &s_connect),
            ("warm snapshots", &s_snap),
            ("fan-out", &s_fan),
            ("end", &s_end),
        ],
        fleet: &fleet,
        pings: pings.load(Ordering::Relaxed),
        metrics: &metrics,
        lagged_lines,
        log_errors,
    });
    println!("{md}");
    if let Some(out) = &args.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    // Agents' streams die with the control plane; don't wait for them.
    drop(control);
    agent_rt.shutdown_background();
    Ok(())
}

struct Report<'a> {
    args: &'a Args,
    loadavg_start: &'a str,
    cmdline: &'a str,
    machine: &'a str,
    ld: &'a LoadStats,
    sizes: &'a Sizes,
    first_snapshot: &'a SnapTiming,
    hold_desc: &'a str,
    full: bool,
    reopen: bool,
    connect_secs: f64,
    connect_sorted: &'a [f64],
    bad_views: usize,
    warm: &'a [SnapTiming],
    raw: &'a [weft_e2e::bench::RawSnapshot],
    cold: &'a [SnapTiming],
    raw_cold: &'a [weft_e2e::bench::RawSnapshot],
    results: &'a [UpdateResult],
    fan_secs: f64,
    samples: [(&'static str, &'a ProcSample); 6],
    fleet: &'a Fleet,
    pings: usize,
    metrics: &'a str,
    lagged_lines: usize,
    log_errors: usize,
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

fn report(r: &Report) -> String {
    let a = r.args;
    let mut s = String::new();
    let done: Vec<&UpdateResult> = r.results.iter().filter(|u| u.last.is_some()).collect();
    let timeouts = r.results.len() - done.len();
    let last = sorted(done.iter().filter_map(|u| u.last).collect());
    let last_send = sorted(done.iter().filter_map(|u| u.last_from_send).collect());
    let first = sorted(r.results.iter().map(|u| u.first).collect());
    let put = sorted(r.results.iter().map(|u| u.put_rtt).collect());
    let per_agent = sorted(
        r.results
            .iter()
            .flat_map(|u| u.per_agent.iter().copied())
            .collect(),
    );
    let early: usize = r.results.iter().map(|u| u.early).sum();
    let arrivals: usize = r.results.iter().map(|u| u.reached).sum();
    let bytes: usize = r.results.iter().map(|u| u.bytes_sum).sum();
    let bytes_per = if arrivals > 0 {
        bytes as f64 / arrivals as f64
    } else {
        f64::NAN
    };
    let warm_line = sorted(r.warm.iter().map(|t| t.applied).collect());
    let warm_hdr = sorted(r.warm.iter().map(|t| t.headers).collect());
    let warm_read = sorted(r.warm.iter().map(|t| t.line).collect());
    let warm_dec = sorted(r.warm.iter().map(|t| t.decoded - t.line).collect());
    let warm_apply = sorted(r.warm.iter().map(|t| t.applied - t.decoded).collect());
    let raw_line = sorted(r.raw.iter().map(|t| ms(t.line)).collect());
    let raw_first = sorted(r.raw.iter().map(|t| ms(t.first_byte)).collect());
    let raw_chunks = sorted(r.raw.iter().map(|t| t.chunks as f64).collect());
    let cold_all = sorted(r.cold.iter().map(|t| t.applied).collect());
    let cold_read = sorted(r.cold.iter().map(|t| t.line).collect());
    let reset_bytes = r.first_snapshot.bytes;
    let end = r.samples[5].1;
    let p = |v: &[f64], q: f64| percentile(v, q);
    let max = |v: &[f64]| v.last().copied().unwrap_or(f64::NAN);

    let p99 = p(&last, 0.99);
    let snap_p50 = p(&warm_line, 0.5);
    let cold_p50 = p(&cold_all, 0.5);
    let rss = end.control_hwm as f64;

    let _ = writeln!(s, "## weft push-stream benchmark\n");
    let _ = writeln!(s, "Command: `{}`  ", r.cmdline);
    let _ = writeln!(
        s,
        "Machine: {} (load average at start: {}; at end: {})  ",
        r.machine,
        r.loadavg_start,
        read_trim("/proc/loadavg")
    );
    let _ = writeln!(
        s,
        "Scale: N = {} Services x E = {} endpoints (one EndpointSlice each), A = {} agents, U = {} updates  ",
        a.services, a.endpoints, a.agents, a.updates
    );
    let _ = writeln!(
        s,
        "Load: {} objects in {:.1} s = **{:.0} objects/s** ({} in flight over keep-alive connections; request p50 {:.1} ms, p99 {:.1} ms)\n",
        r.ld.objects,
        r.ld.secs,
        r.ld.objects as f64 / r.ld.secs,
        a.load_concurrency,
        r.ld.lat_p50,
        r.ld.lat_p99
    );

    let _ = writeln!(s, "| metric | value | target | met? |");
    let _ = writeln!(s, "|---|---|---|---|");
    let _ = writeln!(
        s,
        "| fan-out p50, PUT answered -> {}th agent applied | {:.1} ms | | |",
        a.agents,
        p(&last, 0.5)
    );
    let _ = writeln!(s, "| fan-out p90 | {:.1} ms | | |", p(&last, 0.9));
    let _ = writeln!(
        s,
        "| **fan-out p99** | **{:.1} ms** | <= 200 ms | {} |",
        p99,
        yes(timeouts == 0 && p99 <= 200.0)
    );
    let _ = writeln!(s, "| fan-out max | {:.1} ms | | |", max(&last));
    let _ = writeln!(
        s,
        "| updates timed out (> {} s) | {} of {} | 0 | {} |",
        a.update_timeout_secs,
        timeouts,
        r.results.len(),
        yes(timeouts == 0)
    );
    let _ = writeln!(
        s,
        "| first agent applied, p50 | {:.1} ms | | |",
        p(&first, 0.5)
    );
    let _ = writeln!(
        s,
        "| **new agent's snapshot** (request -> Reset decoded and applied), p50 / max, cached Reset | **{:.0} ms** / {:.0} ms | <= 150 ms | {} |",
        snap_p50,
        max(&warm_line),
        yes(snap_p50 <= 150.0)
    );
    let _ = writeln!(
        s,
        "| new agent's snapshot right after a write (Reset re-encoded), p50 / max | {:.0} ms / {:.0} ms | <= 150 ms | {} |",
        cold_p50,
        max(&cold_all),
        yes(cold_p50 <= 150.0)
    );
    let _ = writeln!(
        s,
        "| Reset frame size | {:.2} MiB ({} bytes) | | |",
        mib(reset_bytes as f64),
        reset_bytes
    );
    let _ = writeln!(
        s,
        "| bytes per update per agent (Delta line incl. newline) | {:.0} B | | |",
        bytes_per
    );
    let _ = writeln!(
        s,
        "| **control plane peak RSS** (VmHWM) | **{:.0} MiB = {:.0} MB** (VmRSS at end {:.0} MiB) | <= 400 MB | {} |",
        mib(rss),
        rss / 1e6,
        mib(end.control_rss as f64),
        yes(rss <= 400e6)
    );
    let _ = writeln!(
        s,
        "| bench process peak RSS (agents + driver) | {:.0} MiB | | |",
        mib(end.self_hwm as f64)
    );
    let _ = writeln!(s);

    let _ = writeln!(s, "### What was measured\n");
    let _ = writeln!(
        s,
        "- Each agent is a tokio task on one 2-worker runtime in this process, with its own HTTP connection and `weft_agent::sync::Stream`. \
         An agent **holds a change** when it has received the frame, decoded it with `StreamFrame::decode` (serde_json into `StreamFrame`) \
         and applied it to its own state. State held: {}.",
        r.hold_desc
    );
    if !r.full {
        let _ = writeln!(
            s,
            "  The hashed view applies frames with `NodeView::apply`'s rules (ordering checks, replace/remove); the cost it skips is keeping \
             the decoded entries (it drops them after hashing)."
        );
    }
    let _ = writeln!(
        s,
        "- Fan-out latency of one update = (instant the A-th agent applied the delta) - (instant the PUT's response body was fully read; \
         the write is durable then). Updates run one at a time; each picks a random Service (seed {}) and flips `ready` of one endpoint of its slice \
         (GET before the timed window). {} of {} agent arrivals came before the PUT response was read and count as 0 ms. \
         From sending the PUT instead: p50 {:.1} ms, p99 {:.1} ms. PUT round trip (includes fsync): p50 {:.1} ms, p99 {:.1} ms.",
        a.seed,
        early,
        arrivals,
        p(&last_send, 0.5),
        p(&last_send, 0.99),
        p(&put, 0.5),
        p(&put, 0.99)
    );
    let _ = writeln!(
        s,
        "- Per-agent latency over all {} arrivals: p50 {:.1} ms, p99 {:.1} ms.",
        arrivals,
        p(&per_agent, 0.5),
        p(&per_agent, 0.99)
    );
    let _ = writeln!(
        s,
        "- Snapshot = a new `Stream::open` + `next_raw` + `StreamFrame::decode` + `NodeView::apply` (full view), measured {} times with all {} agents connected and idle. \
         A 200 ms pause precedes every probe so the previous probe's teardown is not timed. Breakdown (p50): headers {:.1} ms, whole Reset line read {:.0} ms, decode {:.0} ms, apply {:.0} ms. \
         The same request read with a reader that scans only new bytes for the newline: first body byte {:.1} ms, whole line {:.0} ms ({:.0} body chunks).",
        r.warm.len(),
        a.agents,
        p(&warm_hdr, 0.5),
        p(&warm_read, 0.5),
        p(&warm_dec, 0.5),
        p(&warm_apply, 0.5),
        p(&raw_first, 0.5),
        p(&raw_line, 0.5),
        p(&raw_chunks, 0.5)
    );
    let raw_cold_first = sorted(r.raw_cold.iter().map(|t| ms(t.first_byte)).collect());
    let raw_cold_line = sorted(r.raw_cold.iter().map(|t| ms(t.line)).collect());
    let _ = writeln!(
        s,
        "- After a write, the first new agent waits for the control plane to rebuild the Reset (`Control::snapshot`, \
         under the state mutex, so writes wait too): `Stream` line read p50 {:.0} ms (vs {:.0} ms cached); with the linear reader, first body byte \
         p50 {:.0} ms / max {:.0} ms (vs {:.1} ms cached), whole line {:.0} ms.",
        p(&cold_read, 0.5),
        p(&warm_read, 0.5),
        p(&raw_cold_first, 0.5),
        max(&raw_cold_first),
        p(&raw_first, 0.5),
        p(&raw_cold_line, 0.5)
    );
    let _ = writeln!(
        s,
        "- Connecting the {} agents ({} reading a Reset at a time) took {:.1} s; per agent (open -> Reset applied{}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms. \
         {} agents held a view with a Service count other than {}.",
        a.agents,
        a.connect_concurrency,
        r.connect_secs,
        if r.reopen {
            " -> stream reopened with ?since"
        } else {
            ""
        },
        p(r.connect_sorted, 0.5),
        p(r.connect_sorted, 0.99),
        max(r.connect_sorted),
        r.bad_views,
        a.services
    );
    let _ = writeln!(
        s,
        "- One view, measured with a counting allocator: decoded Reset frame {:.1} MiB of heap, `NodeView` {:.1} MiB, hashed view {:.2} MiB; \
         a single uncontended read of the Reset took {:.0} ms, decode {:.0} ms, `NodeView::apply` {:.0} ms, hashed apply {:.0} ms. \
         `NodeView::clone` took {:.0} ms (not exercised by the simulated agents: `weft_agent::sync::follow` does it after every frame it applies); \
         the clone takes {:.1} MiB of heap (clones allocate exact capacities; the decoded view keeps the slack of vectors grown while decoding).",
        mib(r.sizes.decoded_frame as f64),
        mib(r.sizes.full_view as f64),
        mib(r.sizes.hashed_view as f64),
        r.sizes.read_ms,
        r.sizes.decode_ms,
        r.sizes.apply_ms,
        r.sizes.hashed_apply_ms,
        r.sizes.clone_ms,
        mib(r.sizes.cloned_view as f64)
    );
    let _ = writeln!(
        s,
        "- Decode cost of the Reset (best of 3, one thread): as `StreamFrame` {:.0} ms ({:.0} MB/s); its `services` array alone as `Vec<ServiceEntry>` {:.0} ms \
         (the difference is what the frame envelope costs); the whole line as untyped `serde_json::Value` {:.0} ms.",
        r.sizes.frame_ms,
        r.first_snapshot.bytes as f64 / 1e3 / r.sizes.frame_ms,
        r.sizes.entries_ms,
        r.sizes.value_ms
    );
    let _ = writeln!(
        s,
        "- Memory a `weft_agent::sync::Stream` keeps after its Reset line was consumed and dropped: {:.2} MiB. {}",
        mib(r.sizes.reader_retained as f64),
        if r.reopen {
            "That times A would not fit, so each simulated agent reopens its stream with `?since=REV` right after applying the Reset \
             (a resume: no second Reset, the same live subscription on the server)."
        } else {
            "Agents keep their first stream, as `weft_agent::sync::follow` does."
        }
    );

    let _ = writeln!(s, "\n### Resources by phase\n");
    let _ = writeln!(
        s,
        "| after | control VmRSS | control VmHWM | control CPU s | bench VmRSS | bench VmHWM | bench CPU s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (name, x) in r.samples.iter() {
        let _ = writeln!(
            s,
            "| {name} | {:.0} MiB | {:.0} MiB | {:.1} | {:.0} MiB | {:.0} MiB | {:.1} |",
            mib(x.control_rss as f64),
            mib(x.control_hwm as f64),
            x.control_cpu,
            mib(x.self_rss as f64),
            mib(x.self_hwm as f64),
            x.self_cpu
        );
    }
    let fan_ctl = r.samples[4].1.control_cpu - r.samples[3].1.control_cpu;
    let fan_self = r.samples[4].1.self_cpu - r.samples[3].1.self_cpu;
    let _ = writeln!(
        s,
        "\nFan-out phase: {} updates in {:.1} s; CPU per update: control plane {:.1} ms, bench (agents + driver) {:.1} ms.",
        r.results.len(),
        r.fan_secs,
        1e3 * fan_ctl / r.results.len().max(1) as f64,
        1e3 * fan_self / r.results.len().max(1) as f64
    );

    let _ = writeln!(s, "\n### Anomalies\n");
    let m = |n: &str| weft_e2e::bench::metric(r.metrics, n).unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "- agents that died: {}{}",
        r.fleet.died.len(),
        r.fleet
            .died
            .first()
            .map(|(i, why)| format!(" (first: agent {i}: {why})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "- Resets received after the initial one (lagged subscribers): {}; control-plane log lines mentioning `lagged`: {}; ERROR lines: {}",
        r.fleet.late_resets, r.lagged_lines, r.log_errors
    );
    let _ = writeln!(
        s,
        "- pings received: {}; control plane /metrics at end: stream subscribers {}, delta frames encoded {}, delta bytes encoded {}",
        r.pings,
        m("weft_control_stream_subscribers"),
        m("weft_control_stream_frames_encoded_total"),
        m("weft_control_stream_bytes_encoded_total")
    );
    s
}
