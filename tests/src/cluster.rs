//! A simulated cluster out of network namespaces (shared/design.md,
//! "Simulated cluster"), with the real binaries:
//!
//! ```text
//!  <p>-ul: br0 ──┬── v-cp  ═ eth0 (<p>-cp  198.18.0.1)    weft-control :6443
//!                ├── v-n1  ═ eth0 (<p>-n1  198.18.0.11)   weft-agent node-1, weft-workload node-1
//!                ├── v-n2  ═ eth0 (<p>-n2  198.18.0.12)   weft-agent node-2, ...
//!                ├── ...
//!                └── v-ext ═ eth0 (<p>-ext 198.19.255.10) weft-workload external
//!  pods: <p>-p<k>, wired by the real weft-cni run inside their node's namespace
//! ```
//!
//! `<p>` is `wc<pid>x<counter>`, unique per cluster. Every process the
//! cluster starts is killed by pid and every namespace deleted when the
//! [`Cluster`] drops, also when a test panics; logs stay in the run's temp
//! directory (kept with `WEFT_KEEP_TMP`). Only 198.18.0.0/15 addresses are used.
//!
//! Each node is also a cgroup v2 directory (the eBPF dataplane's socket
//! hooks attach there), so that one node's hooks see only that node's
//! sockets, as on separate machines:
//!
//! ```text
//!  <cg2>/weft-t<pid>-<nanos>              the test process (threaded domain)
//!  <cg2>/weft-t<pid>-<nanos>/<p>-node-1   threaded: node-1's agent, CNI runs,
//!                                         host and pod workloads, commands,
//!                                         and [`in_netns`] threads into them
//! ```
//!
//! Threaded cgroups let a single thread of the test process join a node
//! (`cgroup.threads`), so a socket the test makes "from" a pod carries that
//! node's cgroup. The control plane, the external host and the underlay
//! belong to no node. The test process moves back to its own cgroup when
//! its last cluster drops. Each node also has a `bpffs` directory for the
//! agent's pins, unmounted at teardown.

use crate::{bin, node_token, Api, ControlProcess, TempDir};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CONTROL_IP: &str = "198.18.0.1";
pub const CONTROL_LISTEN: &str = "198.18.0.1:6443";
pub const SERVER: &str = "http://198.18.0.1:6443";
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
pub const CLUSTER_CIDR: &str = "198.18.128.0/17";
pub const CLUSTER_DNS: &str = "198.19.0.10";
/// The external test host (design.md: 198.19.255.0/24).
pub const EXTERNAL_IP: &str = "198.19.255.10";
pub const EXTERNAL_NET: &str = "198.19.255.0/24";
pub const UNDERLAY_NET: &str = "198.18.0.0/24";
/// The ports every workload serves.
pub const HTTP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 9090;
/// The agents' `--resync-seconds` in the harness.
pub const RESYNC_SECONDS: u64 = 2;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Why this machine cannot run a simulated cluster (not root, no `ip`,
/// `ip netns add` fails), or None when it can.
pub fn skip_reason() -> Option<String> {
    static REASON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REASON.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the cluster is built from network namespaces)".into());
    }
    let probe = format!("wc{}xprobe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => return Some(format!("cannot run `ip`: {e}")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "`ip netns add` fails: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    None
}

/// Run `f` on a thread that has joined network namespace `netns` and, when
/// the namespace belongs to a node (its own or one of its pods'), that
/// node's cgroup: sockets it creates stay in that namespace and carry the
/// node's cgroup, so the node's socket hooks see them. The thread exits
/// afterwards (the caller's threads are untouched).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    let cgroup = node_cgroup(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns({netns}): {}", std::io::Error::last_os_error());
            }
            if let Some(cg) = &cgroup {
                cgroups::join_thread(cg)
                    .with_context(|| format!("joining {}'s cgroup {}", netns, cg.display()))?;
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {netns} panicked"))?
    })
}

/// A TCP connection to `addr` made from inside `netns`.
pub fn connect_from(netns: &str, addr: SocketAddr) -> Result<TcpStream> {
    let s = in_netns(netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })?
    .with_context(|| format!("connecting to {addr} from {netns}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// `GET path` over HTTP/1.1 from inside `netns`: the status code and the
/// body, whatever the code (the body checked against Content-Length).
pub fn http_status_bytes(
    netns: &str,
    ip: Ipv4Addr,
    port: u16,
    path: &str,
) -> Result<(u16, Vec<u8>)> {
    let addr = SocketAddr::from((ip, port));
    let mut s = connect_from(netns, addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading GET {path} from {addr} (from {netns})"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("GET {path} from {addr}: no HTTP header in the answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path} from {addr}: not HTTP: {head:?}"))?;
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|l| l.trim().parse::<usize>().ok())
    {
        if len != body.len() {
            bail!(
                "GET {path} from {addr}: Content-Length {len}, got {} bytes",
                body.len()
            );
        }
    }
    Ok((code, body))
}

/// `GET path` over HTTP/1.1 from inside `netns`; Ok(body) for a 200.
pub fn http_get(netns: &str, ip: Ipv4Addr, port: u16, path: &str) -> Result<Vec<u8>> {
    let (code, body) = http_status_bytes(netns, ip, port, path)?;
    if code != 200 {
        bail!("GET {path} from {ip}:{port} (from {netns}): HTTP {code}");
    }
    Ok(body)
}

/// `GET path` from inside `netns`: the status code and the body as text.
pub fn http_status(netns: &str, ip: Ipv4Addr, port: u16, path: &str) -> Result<(u16, String)> {
    let (code, body) = http_status_bytes(netns, ip, port, path)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// What a TCP connect from inside a namespace ran into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// Refused at once (a TCP reset or an ICMP port unreachable: a REJECT).
    Refused,
    /// No answer within the timeout (a DROP).
    TimedOut,
    Failed(String),
}

/// Try one TCP connection to `addr` from inside `netns`.
pub fn try_connect(netns: &str, addr: SocketAddr, timeout: Duration) -> Connect {
    match in_netns(netns, || TcpStream::connect_timeout(&addr, timeout)) {
        Ok(Ok(_)) => Connect::Connected,
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Connect::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Connect::TimedOut,
            _ => Connect::Failed(e.to_string()),
        },
        Err(e) => Connect::Failed(format!("{e:#}")),
    }
}

/// Poll `f` every 200 ms until it returns Ok or `timeout` passes (then its last error).
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not within {}s", timeout.as_secs())))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Print `skipped: why` and return true when the cluster tests cannot run here.
pub fn skip() -> bool {
    if let Some(why) = skip_reason() {
        println!("skipped: {why}");
        return true;
    }
    false
}

/// `GET path` as text.
pub fn http_text(netns: &str, ip: Ipv4Addr, port: u16, path: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&http_get(netns, ip, port, path)?).into_owned())
}

/// Send `payload` to `ip:port` over UDP from inside `netns` and return the
/// answer (up to 3 tries, 2 s each).
pub fn udp_request(netns: &str, ip: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Vec<u8>> {
    let sock = in_netns(netns, || UdpSocket::bind("0.0.0.0:0"))??;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = vec![0u8; 65536];
    let mut last = None;
    for _ in 0..3 {
        sock.send_to(payload, (ip, port))?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => return Ok(buf[..n].to_vec()),
            Err(e) => last = Some(e),
        }
    }
    bail!(
        "no UDP answer from {ip}:{port} to {} bytes (from {netns}): {}",
        payload.len(),
        last.map(|e| e.to_string()).unwrap_or_default()
    )
}

/// Run a command, failing with its stderr when it fails.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Kill and reap a child we started (SIGKILL, by pid).
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Remove namespaces left by earlier runs whose process is gone (a test
/// binary killed with SIGKILL cannot clean up after itself).
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix("wc")
            .and_then(|r| r.split_once('x'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = ip(&["netns", "pids", name]) {
            for p in pids
                .lines()
                .filter_map(|p| p.trim().parse::<i32>().ok())
                .filter(|p| *p as u32 != std::process::id())
            {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        let _ = ip(&["netns", "del", name]);
        let _ = std::fs::remove_dir_all(netns_etc(name));
    }
}

/// Where `ip netns exec NAME` finds files it bind-mounts over /etc.
pub fn netns_etc(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// Write a pod's resolv.conf from a CNI result's `dns` object.
fn write_resolv_conf(netns: &str, dns: &Value) -> Result<()> {
    let list = |k: &str| -> Vec<String> {
        dns[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut text = String::new();
    for ns in list("nameservers") {
        text += &format!("nameserver {ns}\n");
    }
    let search = list("search");
    if !search.is_empty() {
        text += &format!("search {}\n", search.join(" "));
    }
    let options = list("options");
    if !options.is_empty() {
        text += &format!("options {}\n", options.join(" "));
    }
    let dir = netns_etc(netns);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("resolv.conf"), text)
        .with_context(|| format!("writing {}/resolv.conf", dir.display()))?;
    Ok(())
}

/// The node cgroup a process or thread "inside" network namespace `netns`
/// joins: its node's, for a node's or a pod's namespace, while the cluster
/// is up; None for the control plane, the external host and the underlay,
/// and when this machine has no cgroup v2.
pub fn node_cgroup(netns: &str) -> Option<PathBuf> {
    cgroups::lookup(netns)
}

/// Make `cmd`, which runs inside `netns` (through `ip netns exec`,
/// `nsenter`, ...), join that namespace's node cgroup before it execs, so
/// it and everything it starts are processes of that node. Does nothing
/// for a namespace of no node.
pub fn enter_node_cgroup(cmd: &mut Command, netns: &str) -> Result<()> {
    match node_cgroup(netns) {
        Some(cg) => cgroups::join_before_exec(cmd, &cg),
        None => Ok(()),
    }
}

/// Why clusters here cannot have node cgroups (no cluster at all, no
/// cgroup v2 mounted, or no threaded cgroup can be made in it), or None
/// when they can: the eBPF dataplane's tests skip on Some.
pub fn cgroup_skip_reason() -> Option<String> {
    if let Some(why) = skip_reason() {
        return Some(why);
    }
    cgroups::usable().err()
}

/// The cgroup v2 directory process `pid` is in (absolute, under the cgroup
/// v2 mount).
pub fn process_cgroup(pid: u32) -> Result<PathBuf> {
    cgroups::of(&format!("/proc/{pid}/cgroup"))
}

/// The service dataplane a cluster's agents run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// The agent's defaults (today's iptables dataplane).
    Iptables,
    /// `--dataplane ebpf`, with the node's cgroup and bpffs directory.
    Ebpf,
}

impl Dataplane {
    /// Chooses the dataplane of clusters whose test does not:
    /// `ebpf` or `iptables` (the default).
    pub const ENV: &'static str = "WEFT_TEST_DATAPLANE";

    /// The dataplane `WEFT_TEST_DATAPLANE` names; iptables when it is unset
    /// or empty.
    pub fn from_env() -> Result<Dataplane> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.is_empty() => v.parse(),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Dataplane::Iptables),
            Err(e) => bail!("{}: {e}", Self::ENV),
        }
    }
}

impl std::str::FromStr for Dataplane {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Dataplane> {
        match s {
            "iptables" => Ok(Dataplane::Iptables),
            "ebpf" => Ok(Dataplane::Ebpf),
            other => bail!(
                "{}={other:?}: expected `ebpf` or `iptables`",
                Dataplane::ENV
            ),
        }
    }
}

impl std::fmt::Display for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dataplane::Iptables => "iptables",
            Dataplane::Ebpf => "ebpf",
        })
    }
}

/// cgroup v2 for the simulated nodes: the test process's threaded domain
/// (refcounted by its clusters), one threaded child per node, and which
/// network namespace belongs to which node's cgroup.
mod cgroups {
    use anyhow::{bail, Context, Result};
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::{Mutex, MutexGuard, OnceLock};
    use std::time::{Duration, Instant};

    /// Where cgroup v2 is mounted: /sys/fs/cgroup/unified on hybrid hosts
    /// (design.md), else /sys/fs/cgroup when that is v2; or why neither.
    pub fn root() -> Result<&'static Path, String> {
        static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        ROOT.get_or_init(|| {
            ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .map(PathBuf::from)
                .find(|d| d.join("cgroup.controllers").exists())
                .ok_or_else(|| {
                    "no cgroup v2 at /sys/fs/cgroup/unified or /sys/fs/cgroup".to_string()
                })
        })
        .as_deref()
        .map_err(Clone::clone)
    }

    /// Whether a domain with a threaded child can be made under [`root`]
    /// (tried once, with an empty pair removed at once).
    pub fn usable() -> Result<(), String> {
        static USABLE: OnceLock<Result<(), String>> = OnceLock::new();
        USABLE
            .get_or_init(|| {
                let dir = root()?.join(format!("weft-t{}-0", std::process::id()));
                let child = dir.join("probe");
                let made = std::fs::create_dir(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))
                    .and_then(|()| create_node(&dir, "probe").map(drop));
                let _ = std::fs::remove_dir(&child);
                let _ = std::fs::remove_dir(&dir);
                made.map_err(|e| format!("{e:#}"))
            })
            .clone()
    }

    struct Domain {
        dir: PathBuf,
        /// Where the process was before it moved in, and goes back to.
        original: PathBuf,
    }

    /// The domain and how many clusters hold it.
    struct State {
        domain: Option<Domain>,
        users: usize,
    }

    static STATE: Mutex<State> = Mutex::new(State {
        domain: None,
        users: 0,
    });

    /// netns name → node cgroup.
    static NODES: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

    fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cluster's hold on the domain; the last one dropped moves the test
    /// process back to its own cgroup and removes the domain.
    pub struct DomainRef {
        pub dir: PathBuf,
    }

    /// Put the test process in its domain (created on first use), or say
    /// why it cannot be.
    pub fn acquire() -> Result<DomainRef, String> {
        let root = root()?;
        let mut st = lock(&STATE);
        if st.domain.is_none() {
            remove_stale(root);
            let dir = root.join(format!("weft-t{}-{}", std::process::id(), crate::nanos()));
            std::fs::create_dir(&dir)
                .map_err(|e| format!("creating cgroup {}: {e}", dir.display()))?;
            st.domain = Some(Domain {
                original: PathBuf::new(),
                dir,
            });
        }
        let users = st.users;
        let domain = st.domain.as_mut().expect("set above");
        if users == 0 {
            if let Err(e) = enter(domain) {
                // A fresh, empty domain goes again; one kept from before stays.
                if std::fs::remove_dir(&domain.dir).is_ok() {
                    st.domain = None;
                }
                return Err(format!("{e:#}"));
            }
        }
        let dir = domain.dir.clone();
        st.users += 1;
        Ok(DomainRef { dir })
    }

    /// Move the whole test process into the domain, remembering where it was.
    fn enter(domain: &mut Domain) -> Result<()> {
        let current = of("/proc/self/cgroup")?;
        if !current.starts_with(&domain.dir) {
            domain.original = current;
        }
        write(
            &domain.dir.join("cgroup.procs"),
            &std::process::id().to_string(),
        )
    }

    impl Drop for DomainRef {
        fn drop(&mut self) {
            let mut st = lock(&STATE);
            st.users -= 1;
            if st.users > 0 {
                return;
            }
            let Some(domain) = st.domain.as_ref() else {
                return;
            };
            let back = domain.original.join("cgroup.procs");
            if let Err(e) = write(&back, &std::process::id().to_string()) {
                eprintln!("cgroups: cannot move the test process back: {e:#}");
                return;
            }
            match remove_tree(&domain.dir) {
                Ok(()) => st.domain = None,
                // Kept for the next cluster of this process, or for the
                // stale sweep of a later run.
                Err(e) => eprintln!("cgroups: leftover {}: {e:#}", domain.dir.display()),
            }
        }
    }

    /// Create node cgroup `name` in the domain, threaded so single threads
    /// of the test process can join it.
    pub fn create_node(domain: &Path, name: &str) -> Result<PathBuf> {
        let dir = domain.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        if let Err(e) = write(&dir.join("cgroup.type"), "threaded") {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    pub fn register(netns: &str, cgroup: &Path) {
        lock(&NODES).insert(netns.to_string(), cgroup.to_path_buf());
    }

    pub fn unregister(netns: &str) {
        lock(&NODES).remove(netns);
    }

    pub fn lookup(netns: &str) -> Option<PathBuf> {
        lock(&NODES).get(netns).cloned()
    }

    /// Move the calling thread (only) into `cgroup`.
    pub fn join_thread(cgroup: &Path) -> Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        write(&cgroup.join("cgroup.threads"), &tid.to_string())
    }

    /// Have `cmd`'s child move itself into `cgroup` between fork and exec.
    pub fn join_before_exec(cmd: &mut Command, cgroup: &Path) -> Result<()> {
        let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
            .with_context(|| format!("cgroup path {}", cgroup.display()))?;
        // SAFETY: the closure runs in the forked child and only calls
        // open/write/close (async-signal-safe) on memory allocated before
        // the fork; reading errno allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" is the writing process: this child.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// The cgroup v2 directory in a `/proc/.../cgroup` file (its `0::` line).
    pub fn of(proc_file: &str) -> Result<PathBuf> {
        let root = root().map_err(anyhow::Error::msg)?;
        let text =
            std::fs::read_to_string(proc_file).with_context(|| format!("reading {proc_file}"))?;
        let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
            bail!("{proc_file} has no cgroup v2 line: {text:?}");
        };
        Ok(root.join(rel.trim_start_matches('/')))
    }

    /// Remove an (empty) cgroup, waiting briefly for exiting processes to
    /// leave it; gone already is fine.
    pub fn remove(dir: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    // cgroup.procs cannot be read in a threaded cgroup.
                    let tasks = std::fs::read_to_string(dir.join("cgroup.threads"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ");
                    return Err(anyhow::Error::new(e).context(format!(
                        "removing cgroup {} (tasks still in it: [{tasks}])",
                        dir.display()
                    )));
                }
            }
        }
    }

    /// Remove `dir` and the cgroups directly under it (node cgroups a
    /// teardown could not remove).
    fn remove_tree(dir: &Path) -> Result<()> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&e.path())?;
                }
            }
        }
        remove(dir)
    }

    /// Remove the domains of test processes that are gone (killed before
    /// their clusters dropped). Only empty cgroups go: processes left in
    /// them are reported, never killed.
    fn remove_stale(root: &Path) {
        let Ok(entries) = std::fs::read_dir(root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("weft-t"))
                .and_then(|r| r.split_once('-'))
                .filter(|(p, n)| {
                    !p.is_empty()
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && n.bytes().all(|b| b.is_ascii_digit())
                })
                .map(|(p, _)| p.to_string())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Err(e) = remove_tree(&e.path()) {
                eprintln!("cgroups: stale domain: {e:#}");
            }
        }
    }

    fn write(path: &Path, value: &str) -> Result<()> {
        std::fs::write(path, value)
            .with_context(|| format!("writing {value} to {}", path.display()))
    }
}

/// Whether `path` has a file system mounted on it (another device than its
/// parent's, or listed in the mount table).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(here), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    if here.dev() != parent.dev() {
        return true;
    }
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mount_points().contains(&path)
}

/// Mount points in this process's mount namespace.
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match octal {
            Some(c) if b[i] == b'\\' => {
                out.push(c);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detach every file system mounted on `path` (an agent that restarted
/// may have stacked more than one).
fn unmount_all(path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    for _ in 0..16 {
        if !is_mount_point(path) {
            return Ok(());
        }
        // SAFETY: umount2 reads a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            bail!(
                "unmounting {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    bail!("{} is still a mount point", path.display())
}

/// Unmount node bpffs directories of earlier runs whose test process is
/// gone (`<tmp>/weft-e2e-wc<pid>x<n>-.../<node>/bpffs`), before their temp
/// directories are reused or removed by hand.
fn remove_stale_mounts() {
    let tmp = std::env::temp_dir();
    for m in mount_points() {
        let Ok(rel) = m.strip_prefix(&tmp) else {
            continue;
        };
        let parts: Vec<_> = rel.iter().filter_map(|p| p.to_str()).collect();
        let [run, _node, "bpffs"] = parts[..] else {
            continue;
        };
        let Some(pid) = run
            .strip_prefix("weft-e2e-wc")
            .and_then(|r| r.split_once('x'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Err(e) = unmount_all(&m) {
            eprintln!("stale bpffs: {e:#}");
        }
    }
}

/// Forwards connections accepted on a loopback port of the calling
/// namespace to `target` inside another namespace: how the test process
/// reaches the control plane.
pub struct Forwarder {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    pub fn start(netns: &str, target: SocketAddr) -> Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let ns = std::fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening network namespace {netns}"))?;
        let flag = stop.clone();
        let cgroup = node_cgroup(netns);
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let name = netns.to_string();
        std::thread::Builder::new()
            .name(format!("fwd-{netns}"))
            .spawn(move || {
                // SAFETY: setns on a valid namespace fd affects only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = ready_tx.send(Err(anyhow::anyhow!("setns({name}): {e}")));
                    return;
                }
                drop(ns);
                // A node's connections carry its cgroup (and so do the
                // splice threads this thread starts).
                if let Some(cg) = &cgroup {
                    if let Err(e) = cgroups::join_thread(cg) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    // connect() here creates the socket in the target namespace.
                    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    else {
                        continue;
                    };
                    splice(client, server);
                }
            })?;
        ready
            .recv()
            .context("the forwarder thread exited")?
            .with_context(|| format!("forwarder into {netns}"))?;
        Ok(Forwarder { addr, stop })
    }
}

fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    for (mut from, mut to) in [(a, b2), (b, a2)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so its thread (and its namespace reference) ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// One node: a namespace with an agent and a host workload.
pub struct Node {
    /// `node-1`, ...
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub state_path: PathBuf,
    pub socket: PathBuf,
    /// The CNI config's `ipamDir` (claims live in `<ipam_base>/weft/`).
    pub ipam_base: PathBuf,
    /// The CNI network config file.
    pub cni_config: PathBuf,
    /// The node's podCIDR once up.
    pub pod_cidr: String,
    agent: Option<Child>,
    /// How many times the agent was started (its log is `agent.<n>.log`).
    pub agent_starts: usize,
    /// Extra flags for the agent's next start.
    pub agent_args: Vec<String>,
    host_workload: Option<Child>,
    /// The node's cgroup v2 directory: every process of the node (agent,
    /// CNI runs, host and pod workloads, commands) and every [`in_netns`]
    /// thread into it is there. None when the machine has none
    /// ([`Cluster::cgroups_unavailable`] says why).
    pub cgroup: Option<PathBuf>,
    /// `<dir>/bpffs`, created empty: where the agent mounts its bpf file
    /// system for the eBPF dataplane. Unmounted at teardown.
    pub bpffs: PathBuf,
}

impl Node {
    /// The IPAM directory of the `weft` network, as the agent reads it.
    pub fn ipam_dir(&self) -> PathBuf {
        self.ipam_base.join("weft")
    }

    /// The log of the agent's latest start.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join(format!("agent.{}.log", self.agent_starts))
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// The pid of the workload running in the node's own namespace.
    pub fn host_workload_pid(&self) -> Option<u32> {
        self.host_workload.as_ref().map(|c| c.id())
    }

    /// The CNI network config the node's runtime uses.
    pub fn cni_conf(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft-cni",
            "nodeStatePath": self.state_path,
            "ipamDir": self.ipam_base,
            "agentSocket": self.socket,
        })
    }
}

/// A pod wired by the CNI plugin, with a workload running in it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Index into [`Cluster::nodes`].
    pub node: usize,
    pub netns: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    /// The CNI ADD result as printed.
    pub cni_result: Value,
}

/// The simulated cluster; tears itself down on drop.
pub struct Cluster {
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    control: Option<ControlProcess>,
    api: Option<Api>,
    rt: tokio::runtime::Runtime,
    /// Namespaces we created, deleted in reverse order.
    namespaces: Vec<String>,
    /// Workloads (the external host; pods' under their container id), killed on drop.
    workloads: Vec<Child>,
    pod_workloads: std::collections::BTreeMap<String, Child>,
    pod_counter: usize,
    known_namespaces: Vec<String>,
    started: Instant,
    /// The dataplane [`Cluster::start_agent`] starts agents with.
    pub dataplane: Dataplane,
    /// Why the nodes have no cgroup (None when they have one).
    pub cgroups_unavailable: Option<String>,
    /// This cluster's hold on the test process's cgroup domain.
    cgroup_domain: Option<cgroups::DomainRef>,
    // Last: removed after everything above is gone.
    pub tmp: TempDir,
}

impl Cluster {
    /// Bring up a cluster of `nodes` nodes (1..=6), wait until every node has
    /// its podCIDR, its node state file and routes to every peer's subnet.
    /// The agents run the dataplane `WEFT_TEST_DATAPLANE` names (iptables
    /// when unset).
    pub fn up(nodes: usize) -> Result<Cluster> {
        Self::up_with(nodes, Dataplane::from_env()?)
    }

    /// [`Cluster::up`] with agents running `dataplane`. The eBPF dataplane
    /// needs node cgroups: check [`cgroup_skip_reason`] first.
    pub fn up_with(nodes: usize, dataplane: Dataplane) -> Result<Cluster> {
        if !(1..=6).contains(&nodes) {
            bail!("a simulated cluster has 1 to 6 nodes, not {nodes}");
        }
        remove_stale_namespaces();
        remove_stale_mounts();
        let (cgroup_domain, cgroups_unavailable) = match cgroups::acquire() {
            Ok(d) => (Some(d), None),
            Err(why) => (None, Some(why)),
        };
        if let Some(why) = &cgroups_unavailable {
            if dataplane == Dataplane::Ebpf {
                bail!("the eBPF dataplane needs node cgroups, and there are none: {why}");
            }
            eprintln!("cluster: nodes without cgroups: {why}");
        }
        let prefix = format!(
            "wc{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let tmp = TempDir::new(&prefix);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut c = Cluster {
            prefix,
            nodes: Vec::new(),
            pods: Vec::new(),
            control: None,
            api: None,
            rt,
            namespaces: Vec::new(),
            workloads: Vec::new(),
            pod_workloads: std::collections::BTreeMap::new(),
            pod_counter: 0,
            known_namespaces: Vec::new(),
            started: Instant::now(),
            dataplane,
            cgroups_unavailable,
            cgroup_domain,
            tmp,
        };
        c.bring_up(nodes)?;
        eprintln!(
            "cluster {}: {nodes} nodes ({}) up in {:.1}s (logs: {})",
            c.prefix,
            c.dataplane,
            c.started.elapsed().as_secs_f64(),
            c.tmp.0.display()
        );
        Ok(c)
    }

    /// The namespace name for `role` (`ul`, `cp`, `n1`, `ext`, `p3`, ...).
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn external_ns(&self) -> String {
        self.ns("ext")
    }

    pub fn external_ip(&self) -> Ipv4Addr {
        EXTERNAL_IP.parse().expect("constant")
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn bring_up(&mut self, n: usize) -> Result<()> {
        // The underlay.
        let ul = self.ns("ul");
        self.add_netns(&ul)?;
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        let mut members = vec![("cp".to_string(), format!("{CONTROL_IP}/24"))];
        for i in 1..=n {
            members.push((format!("n{i}"), format!("198.18.0.{}/24", 10 + i)));
        }
        members.push(("ext".to_string(), format!("{EXTERNAL_IP}/24")));
        for (role, addr) in &members {
            let ns = self.ns(role);
            self.add_netns(&ns)?;
            let host_end = format!("v-{role}");
            ip(&[
                "-n", &ul, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", &ul, "link", "set", &host_end, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        // The external host and the nodes reach each other directly on the
        // underlay segment (design.md's external test hosts).
        let ext = self.ns("ext");
        ip(&["-n", &ext, "route", "add", UNDERLAY_NET, "dev", "eth0"])?;
        for i in 1..=n {
            let node = self.ns(&format!("n{i}"));
            ip(&["-n", &node, "route", "add", EXTERNAL_NET, "dev", "eth0"])?;
            // Like any real node, a default route (here via the external
            // host): a node's own connections to cluster IPs need a route
            // before the service rules translate them.
            ip(&[
                "-n",
                &node,
                "route",
                "add",
                "default",
                "via",
                EXTERNAL_IP,
                "dev",
                "eth0",
            ])?;
        }

        // The control plane.
        let cp_dir = self.tmp.0.join("control");
        let control = ControlProcess::start_in_netns(
            &cp_dir,
            &self.ns("cp"),
            CONTROL_LISTEN,
            &[
                "--service-cidr",
                SERVICE_CIDR,
                "--cluster-cidr",
                CLUSTER_CIDR,
            ],
        )?;
        self.api = Some(control.admin());
        self.control = Some(control);

        // The external host's workload.
        // The external host is also the nodes' upstream DNS server.
        let child = self.spawn_workload_with(
            &ext,
            "external",
            &self.tmp.0.join("external.log"),
            &["--dns", "53"],
        )?;
        self.workloads.push(child);

        // Nodes.
        for i in 1..=n {
            let name = format!("node-{i}");
            let dir = self.tmp.0.join(&name);
            std::fs::create_dir_all(dir.join("bpffs"))?;
            std::fs::write(dir.join("token"), format!("{}\n", node_token(&name)))?;
            let netns = self.ns(&format!("n{i}"));
            let cgroup = match &self.cgroup_domain {
                Some(d) => {
                    let cg = cgroups::create_node(&d.dir, &format!("{}-{name}", self.prefix))?;
                    cgroups::register(&netns, &cg);
                    Some(cg)
                }
                None => None,
            };
            let node = Node {
                netns,
                cgroup,
                bpffs: dir.join("bpffs"),
                ip: Ipv4Addr::new(198, 18, 0, 10 + i as u8),
                state_path: dir.join("node.json"),
                socket: dir.join("agent.sock"),
                ipam_base: dir.join("ipam"),
                cni_config: dir.join("weft.conf"),
                pod_cidr: String::new(),
                agent: None,
                agent_starts: 0,
                agent_args: Vec::new(),
                host_workload: None,
                name,
                dir,
            };
            // Pushed first: teardown removes its cgroup whatever fails next.
            self.nodes.push(node);
            let node = &self.nodes[i - 1];
            std::fs::write(&node.cni_config, node.cni_conf().to_string())?;
            let workload =
                self.spawn_workload(&node.netns, &node.name, &node.dir.join("host-workload.log"))?;
            self.nodes[i - 1].host_workload = Some(workload);
            self.start_agent(i - 1)?;
        }
        self.wait_overlay(Duration::from_secs(60))
    }

    /// Wait until every node has a podCIDR, a node state file and a route
    /// to every other node's subnet.
    fn wait_overlay(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            let last = match self.overlay_ready() {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "cluster {} not up after {}s: {last}",
                    self.prefix,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn overlay_ready(&mut self) -> Result<()> {
        let list = self.get("/api/v1/nodes")?;
        for node in &mut self.nodes {
            let obj = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["metadata"]["name"] == node.name.as_str())
                .with_context(|| format!("{} not registered", node.name))?;
            let cidr = obj["spec"]["podCIDR"].as_str().unwrap_or("");
            if cidr.is_empty() {
                bail!("{} has no podCIDR", node.name);
            }
            node.pod_cidr = cidr.to_string();
            if !node.state_path.exists() {
                bail!("{} has no node state file yet", node.name);
            }
        }
        for node in &self.nodes {
            let routes = ip(&["-n", &node.netns, "route", "show"])?;
            for peer in &self.nodes {
                if peer.name != node.name
                    && !routes
                        .lines()
                        .any(|l| l.starts_with(&format!("{} ", peer.pod_cidr)))
                {
                    bail!(
                        "{} has no route to {}'s {}",
                        node.name,
                        peer.name,
                        peer.pod_cidr
                    );
                }
            }
        }
        Ok(())
    }

    /// Fail with the log's tail if the control plane or an agent exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            if let Some(a) = node.agent.as_mut() {
                if let Some(st) = a.try_wait()? {
                    node.agent = None;
                    bail!(
                        "the agent of {} exited ({st}): {}",
                        node.name,
                        tail(&node.agent_log(), 15)
                    );
                }
            }
        }
        Ok(())
    }

    fn spawn_workload(&self, netns: &str, name: &str, log: &Path) -> Result<Child> {
        self.spawn_workload_with(netns, name, log, &[])
    }

    fn spawn_workload_with(
        &self,
        netns: &str,
        name: &str,
        log: &Path,
        extra: &[&str],
    ) -> Result<Child> {
        let log = log_file(log)?;
        let mut cmd = Command::new("ip");
        enter_node_cgroup(&mut cmd, netns)?;
        let child = cmd
            .args(["netns", "exec", netns])
            .arg(bin("weft-workload")?)
            .args(["--name", name])
            .args(["--http", &HTTP_PORT.to_string()])
            .args(["--udp", &UDP_PORT.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting weft-workload")?;
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        let lo = SocketAddr::from(([127, 0, 0, 1], HTTP_PORT));
        while connect_from(netns, lo).is_err() {
            if Instant::now() > deadline {
                bail!("weft-workload {name} in {netns} does not listen on {HTTP_PORT}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// Start (or restart) node `i`'s agent with [`Cluster::dataplane`]; its
    /// log is a new `agent.<n>.log`.
    ///
    /// `nsenter --net`, not `ip netns exec`: the agent stays in the host's
    /// mount namespace, so the bpffs it mounts on [`Node::bpffs`] (and its
    /// pins) outlive it for a restart, and it sees the cgroup v2 mount
    /// (`ip netns exec` remounts /sys without it). It joins the node's
    /// cgroup before exec.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let dataplane = self.dataplane;
        let node = &mut self.nodes[i];
        if node.agent.is_some() {
            bail!("the agent of {} is running", node.name);
        }
        let mut dataplane_args: Vec<std::ffi::OsString> = Vec::new();
        if dataplane == Dataplane::Ebpf {
            let cg = node.cgroup.as_ref().with_context(|| {
                format!("the eBPF dataplane on {} needs a node cgroup", node.name)
            })?;
            dataplane_args.extend(["--dataplane".into(), "ebpf".into()]);
            dataplane_args.extend(["--cgroup-path".into(), cg.into()]);
            dataplane_args.extend(["--bpffs-path".into(), node.bpffs.clone().into()]);
        }
        node.agent_starts += 1;
        let log = log_file(&node.agent_log())?;
        let mut cmd = Command::new("nsenter");
        if let Some(cg) = &node.cgroup {
            cgroups::join_before_exec(&mut cmd, cg)?;
        }
        let child = cmd
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg("--")
            .arg(bin("weft-agent")?)
            .args(["--server", SERVER, "--token-file"])
            .arg(node.dir.join("token"))
            .args(["--node-name", &node.name])
            .args(["--node-ip", &node.ip.to_string()])
            .args(["--cluster-cidr", CLUSTER_CIDR, "--cluster-dns", CLUSTER_DNS])
            // Names outside the cluster go to the external host's DNS.
            .args(["--dns-upstream", &format!("{EXTERNAL_IP}:53")])
            .arg("--node-state")
            .arg(&node.state_path)
            .arg("--socket")
            .arg(&node.socket)
            .arg("--ipam-dir")
            .arg(node.ipam_dir())
            .args(["--resync-seconds", &RESYNC_SECONDS.to_string()])
            // Each simulated node is its own host: its own xtables lock (the
            // default /run/xtables.lock is shared by every namespace).
            .env("XTABLES_LOCKFILE", node.dir.join("xtables.lock"))
            .args(&dataplane_args)
            .args(&node.agent_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting weft-agent (through nsenter)")?;
        node.agent = Some(child);
        Ok(())
    }

    /// SIGKILL node `i`'s agent (as a crash would) and reap it.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            kill(&mut a);
        }
    }

    /// The text of node `i`'s current agent log.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].agent_log()).unwrap_or_default()
    }

    // ---- the API ----

    fn api(&self) -> Result<&Api> {
        self.api.as_ref().context("no control plane")
    }

    fn call(&self, method: hyper::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let api = self.api()?.clone();
        let m = method.clone();
        let res = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), api.req(m, path, body)).await
        });
        match res {
            Err(_) => bail!("{method} {path}: no answer within 10s"),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(f)) => bail!(
                "{method} {path}: HTTP {}: {}",
                f.code,
                f.status["message"]
                    .as_str()
                    .unwrap_or(&f.status.to_string())
            ),
        }
    }

    /// Admin GET.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.call(hyper::Method::GET, path, None)
    }
    /// Admin POST.
    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.call(hyper::Method::POST, path, Some(body))
    }
    /// Admin PUT.
    pub fn put(&self, path: &str, body: Value) -> Result<Value> {
        self.call(hyper::Method::PUT, path, Some(body))
    }
    /// GET, change, PUT (retried on a conflict).
    pub fn update(&self, path: &str, mut change: impl FnMut(&mut Value)) -> Result<Value> {
        let mut last = None;
        for _ in 0..5 {
            let mut obj = self.get(path)?;
            change(&mut obj);
            match self.put(path, obj) {
                Ok(v) => return Ok(v),
                Err(e) if format!("{e:#}").contains("HTTP 409") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PUT {path}: conflicts")))
    }
    /// Admin DELETE.
    pub fn delete(&self, path: &str) -> Result<Value> {
        self.call(hyper::Method::DELETE, path, None)
    }

    /// The control plane's data/log directory.
    pub fn control_dir(&self) -> PathBuf {
        self.tmp.0.join("control")
    }

    fn ensure_namespace(&mut self, ns: &str) -> Result<()> {
        if self.known_namespaces.iter().any(|n| n == ns) {
            return Ok(());
        }
        if self.get(&format!("/api/v1/namespaces/{ns}")).is_err() {
            self.post(
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )?;
        }
        self.known_namespaces.push(ns.to_string());
        Ok(())
    }

    // ---- pods ----

    /// Create Pod `ns/name` bound to node `node` (index), wire it with the
    /// real CNI plugin as a runtime does, and start its workload.
    pub fn add_pod(
        &mut self,
        node: usize,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        self.add_pod_with(node, ns, name, labels, None)
    }

    /// [`Cluster::add_pod`] with CNI `runtimeConfig.portMappings` (hostPorts),
    /// as a runtime passes them.
    pub fn add_pod_with(
        &mut self,
        node: usize,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        port_mappings: Option<Value>,
    ) -> Result<Pod> {
        self.ensure_namespace(ns)?;
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let node_name = self.nodes[node].name.clone();
        let created = self.post(
            &format!("/api/v1/namespaces/{ns}/pods"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {
                    "nodeName": node_name,
                    "containers": [{
                        "name": "app", "image": "weft-workload",
                        "ports": [
                            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                            {"name": "udp", "containerPort": UDP_PORT, "protocol": "UDP"}
                        ]
                    }]
                }
            }),
        )?;
        let uid = created["metadata"]["uid"]
            .as_str()
            .unwrap_or("")
            .to_string();
        self.pod_counter += 1;
        let k = self.pod_counter;
        let netns = self.ns(&format!("p{k}"));
        self.add_netns(&netns)?;
        // A pod's processes are its node's.
        if let Some(cg) = &self.nodes[node].cgroup {
            cgroups::register(&netns, cg);
        }
        let container_id = format!("{}-{k}-{name}", self.prefix);
        let cni_args =
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}");
        let mut pod = Pod {
            namespace: ns.to_string(),
            name: name.to_string(),
            uid,
            node,
            netns: netns.clone(),
            container_id: container_id.clone(),
            ip: Ipv4Addr::UNSPECIFIED,
            cni_result: Value::Null,
        };
        let runtime = port_mappings.map(|m| json!({"portMappings": m}));
        let out = self.cni_with(node, "ADD", &container_id, &netns, &cni_args, runtime)?;
        // From here on the pod holds an address: DEL it on drop whatever happens.
        self.pods.push(pod.clone());
        if !out.status.success() {
            bail!(
                "CNI ADD for {ns}/{name} on {node_name} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let result: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("CNI ADD printed no JSON for {ns}/{name}"))?;
        let addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .with_context(|| format!("CNI ADD result has no ips[0].address: {result}"))?;
        // What a runtime does with the CNI result's DNS: the pod's
        // resolv.conf (`ip netns exec` bind-mounts /etc/netns/NAME/*).
        write_resolv_conf(&netns, &result["dns"])?;
        pod.ip = addr;
        pod.cni_result = result;
        *self.pods.last_mut().expect("pushed above") = pod.clone();
        let log = self.tmp.0.join(format!("pod-{ns}-{name}.log"));
        let child = self.spawn_workload(&netns, name, &log)?;
        self.pod_workloads.insert(container_id, child);
        Ok(pod)
    }

    /// Delete the Pod object (`grace` seconds of graceful termination, during
    /// which its endpoints are terminating; 0 = at once). The pod keeps
    /// running and wired until [`Cluster::unwire_pod`].
    pub fn delete_pod(&self, pod: &Pod, grace: u32) -> Result<()> {
        self.delete(&format!(
            "/api/v1/namespaces/{}/pods/{}?gracePeriodSeconds={grace}",
            pod.namespace, pod.name
        ))?;
        Ok(())
    }

    /// Stop the pod as its runtime would: kill its workload, CNI DEL, delete
    /// its network namespace (and the Pod object if still there).
    pub fn unwire_pod(&mut self, pod: &Pod) -> Result<()> {
        if let Some(mut w) = self.pod_workloads.remove(&pod.container_id) {
            kill(&mut w);
        }
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let out = self.cni(pod.node, "DEL", &pod.container_id, &pod.netns, &args)?;
        if !out.status.success() {
            bail!(
                "CNI DEL of {}/{}: {}",
                pod.namespace,
                pod.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        self.pods.retain(|p| p.container_id != pod.container_id);
        cgroups::unregister(&pod.netns);
        ip(&["netns", "del", &pod.netns])?;
        let _ = std::fs::remove_dir_all(netns_etc(&pod.netns));
        self.namespaces.retain(|n| n != &pod.netns);
        let _ = self.delete(&format!(
            "/api/v1/namespaces/{}/pods/{}?gracePeriodSeconds=0",
            pod.namespace, pod.name
        ));
        Ok(())
    }

    /// The pid of the workload running in `pod`, while it runs.
    pub fn workload_pid(&self, pod: &Pod) -> Option<u32> {
        self.pod_workloads.get(&pod.container_id).map(|c| c.id())
    }

    /// Set the pod's Ready condition (as a kubelet's readiness probe would).
    pub fn set_pod_ready(&self, pod: &Pod, ready: bool) -> Result<()> {
        let path = format!("/api/v1/namespaces/{}/pods/{}", pod.namespace, pod.name);
        let mut obj = self.get(&path)?;
        let status = if ready { "True" } else { "False" };
        let conds = obj["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut conds: Vec<Value> = conds.into_iter().filter(|c| c["type"] != "Ready").collect();
        conds.push(json!({"type": "Ready", "status": status}));
        obj["status"]["conditions"] = Value::Array(conds);
        self.put(&format!("{path}/status"), obj)?;
        Ok(())
    }

    /// Run the CNI plugin inside node `node`'s namespace, as a runtime does.
    fn cni(
        &self,
        node: usize,
        command: &str,
        container_id: &str,
        netns: &str,
        cni_args: &str,
    ) -> Result<Output> {
        self.cni_with(node, command, container_id, netns, cni_args, None)
    }

    /// [`Cluster::cni`] with a `runtimeConfig` added to the network config.
    fn cni_with(
        &self,
        node: usize,
        command: &str,
        container_id: &str,
        netns: &str,
        cni_args: &str,
        runtime_config: Option<Value>,
    ) -> Result<Output> {
        let n = &self.nodes[node];
        let plugin = bin("weft-cni")?;
        let mut cmd = Command::new("ip");
        if let Some(cg) = &n.cgroup {
            cgroups::join_before_exec(&mut cmd, cg)?;
        }
        let mut child = cmd
            .args(["netns", "exec", &n.netns])
            .arg(&plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env(
                "CNI_NETNS",
                if netns.is_empty() {
                    String::new()
                } else {
                    format!("/run/netns/{netns}")
                },
            )
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", plugin.parent().unwrap_or(Path::new("/")))
            .env("CNI_ARGS", cni_args)
            .env("WEFT_CNI_LOG", n.dir.join("cni.log"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting weft-cni")?;
        let mut conf = std::fs::read(&n.cni_config)?;
        if let Some(rc) = runtime_config {
            let mut v: Value = serde_json::from_slice(&conf)?;
            v["runtimeConfig"] = rc;
            conf = v.to_string().into_bytes();
        }
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&conf)?;
        }
        Ok(child.wait_with_output()?)
    }

    // ---- commands ----

    /// Run `args` inside network namespace `netns` (`ip netns exec`), in its
    /// node's cgroup when it has one.
    pub fn exec(&self, netns: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        enter_node_cgroup(&mut cmd, netns)?;
        cmd.args(["netns", "exec", netns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {args:?} in {netns}"))
    }

    /// Like [`Cluster::exec`], Ok(stdout) only when the command succeeds.
    pub fn sh(&self, netns: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        enter_node_cgroup(&mut cmd, netns)?;
        run(cmd.args(["netns", "exec", netns]).args(args))
    }

    /// Node `i`'s overlay as the kernel holds it: routes, the VXLAN
    /// device's neighbours and FDB entries.
    pub fn overlay_state(&self, i: usize) -> Result<String> {
        let ns = &self.nodes[i].netns;
        Ok(format!(
            "# ip route\n{}# ip neigh show dev weft.1\n{}# bridge fdb show dev weft.1\n{}",
            self.sh(ns, &["ip", "route", "show"])?,
            self.sh(ns, &["ip", "neigh", "show", "dev", "weft.1"])?,
            self.sh(ns, &["bridge", "fdb", "show", "dev", "weft.1"])?,
        ))
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            let kept = if std::env::var_os("WEFT_KEEP_TMP").is_some() {
                "kept"
            } else {
                "removed; set WEFT_KEEP_TMP=1 to keep them"
            };
            eprintln!(
                "cluster {}: test failed; logs in {} ({kept})",
                self.prefix,
                self.tmp.0.display()
            );
            for node in &self.nodes {
                eprintln!(
                    "--- {} ({}):\n{}",
                    node.name,
                    node.agent_log().display(),
                    tail(&node.agent_log(), 12)
                );
            }
            let cl = self.control_dir().join("control.log");
            eprintln!("--- control ({}):\n{}", cl.display(), tail(&cl, 12));
        }
        for w in self
            .workloads
            .iter_mut()
            .chain(self.pod_workloads.values_mut())
        {
            kill(w);
        }
        for node in &mut self.nodes {
            if let Some(w) = node.host_workload.as_mut() {
                kill(w);
            }
        }
        // Pods: CNI DEL, their namespace, their API object.
        let pods = std::mem::take(&mut self.pods);
        for p in pods.iter().rev() {
            let args = format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                p.namespace, p.name, p.uid
            );
            match self.cni(p.node, "DEL", &p.container_id, &p.netns, &args) {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cluster {}: CNI DEL of {}/{} failed: {}",
                    self.prefix,
                    p.namespace,
                    p.name,
                    String::from_utf8_lossy(&o.stdout)
                ),
                Err(e) => eprintln!("cluster {}: CNI DEL of {}: {e:#}", self.prefix, p.name),
            }
            if self.control.is_some() {
                let _ = self.delete(&format!(
                    "/api/v1/namespaces/{}/pods/{}",
                    p.namespace, p.name
                ));
            }
        }
        for node in &mut self.nodes {
            if let Some(mut a) = node.agent.take() {
                kill(&mut a);
            }
        }
        self.api = None;
        if let Some(mut c) = self.control.take() {
            c.kill9();
        }
        // Nothing joins a node's cgroup from here on.
        for ns in &self.namespaces {
            cgroups::unregister(ns);
        }
        for ns in self.namespaces.iter().rev() {
            // Anything still running in it (a client a test started) goes too.
            if let Ok(pids) = ip(&["netns", "pids", ns]) {
                for p in pids
                    .lines()
                    .filter_map(|p| p.trim().parse::<i32>().ok())
                    .filter(|p| *p as u32 != std::process::id())
                {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cluster {}: {e:#}", self.prefix);
            }
            let _ = std::fs::remove_dir_all(netns_etc(ns));
        }
        // Every process we started is gone: the node cgroups are empty
        // unless something else joined them, which is reported, not killed.
        for node in &self.nodes {
            if let Some(cg) = &node.cgroup {
                if let Err(e) = cgroups::remove(cg) {
                    eprintln!("cluster {}: leftover {e:#}", self.prefix);
                }
            }
            // Before the temp directory goes: removing files in a mounted
            // bpffs would unpin maps.
            if let Err(e) = unmount_all(&node.bpffs) {
                eprintln!("cluster {}: {e:#}", self.prefix);
            }
        }
        // The last cluster of the process moves it back to its own cgroup.
        self.cgroup_domain = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataplane_names() {
        assert_eq!("ebpf".parse::<Dataplane>().unwrap(), Dataplane::Ebpf);
        assert_eq!(
            "iptables".parse::<Dataplane>().unwrap(),
            Dataplane::Iptables
        );
        let err = "nft".parse::<Dataplane>().unwrap_err().to_string();
        assert!(err.contains("WEFT_TEST_DATAPLANE=\"nft\""), "{err}");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape_mountinfo(r"/tmp/x\0"), r"/tmp/x\0");
    }

    /// Every process of a node (agent, host and pod workloads, commands)
    /// and every in-process client into it is in that node's cgroup and in
    /// no other node's; the control plane and the external host are in
    /// none; nothing is left once the cluster drops.
    #[test]
    fn node_processes_live_in_their_node_cgroup() -> Result<()> {
        if skip() {
            return Ok(());
        }
        if let Some(why) = cgroup_skip_reason() {
            println!("skipped: {why}");
            return Ok(());
        }
        let before = cgroups::of("/proc/self/cgroup")?;
        let mut c = Cluster::up_with(2, Dataplane::Iptables)?;
        let pods = [c.add_pod(0, "cg", "a", &[])?, c.add_pod(1, "cg", "b", &[])?];
        let cgs = c
            .nodes
            .iter()
            .map(|n| n.cgroup.clone().context("a node without a cgroup"))
            .collect::<Result<Vec<_>>>()?;
        assert_ne!(cgs[0], cgs[1]);
        let domain = cgroups::of("/proc/self/cgroup")?;
        assert!(
            cgs.iter().all(|cg| cg.parent() == Some(domain.as_path())),
            "{cgs:?} not under {}",
            domain.display()
        );
        let thread_cgroup = || cgroups::of("/proc/thread-self/cgroup");
        for (i, node) in c.nodes.iter().enumerate() {
            let agent = node.agent_pid().context("no agent")?;
            assert_eq!(process_cgroup(agent)?, cgs[i], "agent of {}", node.name);
            let host = node.host_workload_pid().context("no host workload")?;
            assert_eq!(
                process_cgroup(host)?,
                cgs[i],
                "host workload of {}",
                node.name
            );
            let cat = c.sh(&node.netns, &["cat", "/proc/self/cgroup"])?;
            let rel = cgs[i].strip_prefix(cgroups::root().unwrap()).unwrap();
            assert!(
                cat.lines().any(|l| l == format!("0::/{}", rel.display())),
                "a command in {}: {cat}",
                node.netns
            );
            assert_eq!(in_netns(&node.netns, thread_cgroup)??, cgs[i]);
        }
        for pod in &pods {
            let pid = c.workload_pid(pod).context("no workload")?;
            assert_eq!(
                process_cgroup(pid)?,
                cgs[pod.node],
                "workload of {}",
                pod.name
            );
            assert_eq!(in_netns(&pod.netns, thread_cgroup)??, cgs[pod.node]);
        }
        for ns in [c.external_ns(), c.ns("cp"), c.ns("ul")] {
            assert_eq!(in_netns(&ns, thread_cgroup)??, domain, "a thread in {ns}");
        }
        let control = c
            .control
            .as_ref()
            .and_then(|p| p.pid())
            .context("no control")?;
        assert_eq!(process_cgroup(control)?, domain);
        // The calling thread is where it was.
        assert_eq!(thread_cgroup()?, domain);
        // bpffs mounted on a node's directory, twice (as by an agent and
        // its restart): teardown unmounts both before removing the files.
        let bpffs = c.nodes[0].bpffs.clone();
        let target = CString::new(bpffs.as_os_str().as_bytes())?;
        for _ in 0..2 {
            // SAFETY: valid NUL-terminated strings; no data argument.
            let rc = unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    target.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "mount bpf: {}", std::io::Error::last_os_error());
        }
        assert!(is_mount_point(&bpffs));
        drop(c);
        assert!(
            !mount_points().contains(&bpffs),
            "{} still mounted",
            bpffs.display()
        );
        for cg in &cgs {
            assert!(!cg.exists(), "{} left behind", cg.display());
        }
        assert_eq!(cgroups::of("/proc/self/cgroup")?, before);
        assert!(!domain.exists(), "{} left behind", domain.display());
        Ok(())
    }
}
