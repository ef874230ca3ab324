//! Helpers of the privileged benchmarks (`weft-cni-bench`,
//! `weft-overlay-bench`, `weft-services-bench`): named network namespaces
//! removed by a drop guard, `ip` and `ip netns exec` wrappers, running code
//! on a thread that entered a namespace, a threaded cgroup for eBPF socket
//! programs, a private bpffs mount, and sockperf request/response runs.

use anyhow::{bail, Context};
use std::ffi::CString;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Root is needed for namespaces; say so plainly instead of failing later.
pub fn require_root(bench: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{bench} creates network namespaces and links: run it as root");
    }
    Ok(())
}

/// `ip ARGS...`; stdout on success, the command and its stderr otherwise.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// Any command; stdout on success, the command and its stderr otherwise.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Enter the named network namespace on the calling thread (threads and
/// processes it starts afterwards inherit it).
pub fn enter(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let fd = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on the calling thread with a valid namespace fd.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Run `f` on a new thread inside the named namespace.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || {
        enter(&name)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in a namespace panicked"))?
}

/// Named namespaces `<prefix><tag>`, all deleted on drop (in reverse order),
/// also when the bench fails half-way.
pub struct Namespaces {
    prefix: String,
    names: Vec<String>,
}

impl Namespaces {
    /// `short` is a 3-letter bench tag; the prefix is `<short><pid>-`.
    /// Namespaces left by an earlier run of the same bench whose process is
    /// gone (killed before its guard ran) are removed first.
    pub fn new(short: &str) -> Namespaces {
        remove_stale(short);
        Namespaces {
            prefix: format!("{short}{}-", std::process::id()),
            names: Vec::new(),
        }
    }

    pub fn name(&self, tag: &str) -> String {
        format!("{}{tag}", self.prefix)
    }

    /// `ip netns add <prefix><tag>`, with loopback up; returns the full name.
    pub fn add(&mut self, tag: &str) -> anyhow::Result<String> {
        let name = self.name(tag);
        ip(&["netns", "add", &name])?;
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Delete the namespaces added so far (links inside go with them).
    pub fn clear(&mut self) {
        for ns in self.names.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.clear();
    }
}

fn remove_stale(short: &str) {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(short) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale namespace {name} (process {pid} is gone)");
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Median / p90 / p99 / max of a sample (nearest rank), in the sample's unit.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn summarize(v: &[f64]) -> Summary {
    let s = crate::bench::sorted(v.to_vec());
    Summary {
        n: s.len(),
        p50: crate::bench::percentile(&s, 0.5),
        p90: crate::bench::percentile(&s, 0.9),
        p99: crate::bench::percentile(&s, 0.99),
        max: s.last().copied().unwrap_or(f64::NAN),
    }
}

/// A machine description line for reports.
/// The opening lines of a benchmark report: title, exact command line, and
/// the machine with its load at the start and now.
pub fn report_header(title: &str, load_start: &str) -> String {
    let cmdline: Vec<String> = std::env::args().collect();
    format!(
        "#### {title}\n\nCommand: `{}`  \nMachine: {} (load average at start: {load_start}; at end: {})  \n",
        cmdline.join(" "),
        machine(),
        loadavg()
    )
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1048576.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}), {total} RAM, Linux {kernel}")
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------- cgroups

/// The cgroup v2 hierarchy (the unified one of a hybrid setup first).
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|d| d.join("cgroup.controllers").exists())
}

/// A threaded cgroup subtree for this process, so that single threads (and
/// the processes they start) can get cgroup socket programs while the rest
/// of the process does not: the process moves into the domain
/// `<root>/<short><pid>-cg`, whose `threaded` child `node` gets the
/// programs; a thread joins it with [`ThreadedCgroup::join`]. Dropping
/// moves the process back to its cgroup and removes both directories (which
/// also releases programs attached to them).
pub struct ThreadedCgroup {
    original: PathBuf,
    domain: PathBuf,
    /// The threaded child: attach programs here.
    pub node: PathBuf,
}

impl ThreadedCgroup {
    /// `short` is the bench's 3-letter tag. Directories left by an earlier
    /// run whose process is gone are removed first.
    pub fn create(short: &str) -> anyhow::Result<ThreadedCgroup> {
        let root = cgroup2_root()
            .context("no cgroup v2 hierarchy (needed for the eBPF socket programs)")?;
        remove_stale_cgroups(&root, short);
        let own =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?;
        let original = root.join(rel.trim_start_matches('/'));
        let domain = root.join(format!("{short}{}-cg", std::process::id()));
        std::fs::create_dir(&domain).with_context(|| format!("creating {}", domain.display()))?;
        let node = domain.join("node");
        // From here on, drop cleans up whatever exists.
        let cg = ThreadedCgroup {
            original,
            domain,
            node,
        };
        std::fs::create_dir(&cg.node).with_context(|| format!("creating {}", cg.node.display()))?;
        std::fs::write(cg.node.join("cgroup.type"), "threaded")
            .with_context(|| format!("making {} threaded", cg.node.display()))?;
        std::fs::write(
            cg.domain.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("moving this process into {}", cg.domain.display()))?;
        Ok(cg)
    }

    /// Put the calling thread into `node` (its new sockets get the programs).
    pub fn join(node: &Path) -> anyhow::Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        std::fs::write(node.join("cgroup.threads"), tid.to_string())
            .with_context(|| format!("joining {}", node.display()))
    }

    /// The path a child process writes "0" to in `pre_exec` to join `node`
    /// (it is single-threaded there, and in the domain it was forked in).
    pub fn threads_file(node: &Path) -> anyhow::Result<CString> {
        CString::new(node.join("cgroup.threads").as_os_str().as_bytes())
            .context("cgroup path with a NUL byte")
    }
}

impl Drop for ThreadedCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(
            self.original.join("cgroup.procs"),
            std::process::id().to_string(),
        ) {
            eprintln!("cleanup: moving back to {}: {e}", self.original.display());
        }
        for d in [&self.node, &self.domain] {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("cleanup: removing {}: {e}", d.display());
            }
        }
    }
}

fn remove_stale_cgroups(root: &Path, short: &str) {
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(short).and_then(|r| r.strip_suffix("-cg")) else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale cgroup {name} (process {pid} is gone)");
            let _ = std::fs::remove_dir(e.path().join("node"));
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

// ---------------------------------------------------------------- bpffs

/// A directory for a private bpf filesystem (`<tmp>/<short><pid>-bpffs-<tag>`;
/// the loader mounts it): unmounted and removed on drop, which unpins the
/// maps and links in it. Mounts left by an earlier run whose process is
/// gone are removed first.
pub struct BpffsDir(pub PathBuf);

impl BpffsDir {
    pub fn new(short: &str, tag: &str) -> BpffsDir {
        let tmp = std::env::temp_dir();
        if let Ok(dir) = std::fs::read_dir(&tmp) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((pid, _)) = name
                    .strip_prefix(short)
                    .and_then(|r| r.split_once("-bpffs-"))
                else {
                    continue;
                };
                if !pid.is_empty()
                    && pid.bytes().all(|b| b.is_ascii_digit())
                    && !Path::new(&format!("/proc/{pid}")).exists()
                {
                    eprintln!("removing stale bpffs {name} (process {pid} is gone)");
                    unmount_and_remove(&e.path());
                }
            }
        }
        BpffsDir(tmp.join(format!("{short}{}-bpffs-{tag}", std::process::id())))
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        unmount_and_remove(&self.0);
    }
}

fn unmount_and_remove(path: &Path) {
    if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: a valid path; detaching a mount made by this bench (or an
        // earlier run of it); EINVAL when nothing is mounted there.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir_all(path);
}

// ---------------------------------------------------------------- sockperf

/// `sockperf`'s version line, or why it cannot be used.
pub fn sockperf_version() -> Result<String, String> {
    let out = Command::new("sockperf")
        .arg("--version")
        .output()
        .map_err(|e| format!("sockperf not found ({e}); `cargo xtask setup` installs it"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| l.contains("version"))
        .map(|l| l.trim().to_string())
        .ok_or_else(|| format!("sockperf --version said: {}", text.trim()))
}

/// `sockperf server` in a namespace; killed (by its pid) and reaped on drop.
/// `busy`: non-blocking sockets, polled in a loop (it spins on a CPU for as
/// long as it runs).
pub struct SockperfServer {
    child: std::process::Child,
}

impl SockperfServer {
    pub fn start(
        ns: &str,
        addr: SocketAddr,
        tcp: bool,
        busy: bool,
    ) -> anyhow::Result<SockperfServer> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "sockperf", "server", "-i"])
            .arg(addr.ip().to_string())
            .arg("-p")
            .arg(addr.port().to_string());
        if tcp {
            cmd.arg("--tcp");
        }
        if busy {
            cmd.arg("--nonblocked");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning sockperf server")?;
        std::thread::sleep(Duration::from_millis(500));
        if let Some(status) = child.try_wait()? {
            bail!("sockperf server on {addr} in {ns} exited at once: {status}");
        }
        Ok(SockperfServer { child })
    }
}

impl Drop for SockperfServer {
    fn drop(&mut self) {
        // `ip netns exec` execs sockperf: the pid is sockperf's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `sockperf ping-pong` run of `secs` seconds from the calling thread's
/// network namespace (the client process inherits it), in `cgroup` when
/// given (the child joins that threaded cgroup before exec). `busy`:
/// non-blocking socket polled in a loop, so the client never sleeps.
/// Returns the round-trip time of every message of the run's valid period,
/// in µs (sockperf's `--full-log`; its warm-up is not in it).
pub fn sockperf_pingpong(
    addr: SocketAddr,
    tcp: bool,
    busy: bool,
    secs: u64,
    msg_size: usize,
    cgroup: Option<&Path>,
) -> anyhow::Result<Vec<f64>> {
    let log = std::env::temp_dir().join(format!(
        "sockperf-{}-{:?}.csv",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut cmd = Command::new("sockperf");
    cmd.args(["ping-pong", "-i"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-t")
        .arg(secs.to_string())
        .arg("-m")
        .arg(msg_size.to_string())
        .arg("--full-rtt")
        .arg("--full-log")
        .arg(&log);
    if tcp {
        cmd.arg("--tcp");
    }
    if busy {
        cmd.arg("--nonblocked");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(node) = cgroup {
        let file = ThreadedCgroup::threads_file(node)?;
        // SAFETY: the closure runs in the forked child before exec and only
        // calls open/write/close (async-signal-safe) on a path built before
        // the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if rc != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().context("spawning sockperf ping-pong")?;
    let pid = child.id() as libc::pid_t;
    // A run that never gets answers must not hang the bench.
    let limit = Duration::from_secs(secs + 15);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let dog = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            if flag.load(std::sync::atomic::Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if flag.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        // SAFETY: our own child, not reaped yet (the flag is set after the wait).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        true
    });
    let out = child.wait_with_output();
    done.store(true, std::sync::atomic::Ordering::Release);
    let killed = dog.join().unwrap_or(false);
    let out = out.context("waiting for sockperf")?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    if killed {
        bail!(
            "sockperf ping-pong to {addr} did not finish in {} s",
            limit.as_secs()
        );
    }
    if !out.status.success() {
        bail!(
            "sockperf ping-pong to {addr}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let rtts = parse_full_log(&text);
    if rtts.is_empty() {
        bail!(
            "sockperf ping-pong to {addr}: no round trips in its log; it said: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(rtts)
}

/// The `rtt(usec)` column of a sockperf `--full-log` (CSV after a header
/// line naming the columns, then a `----` line).
pub fn parse_full_log(text: &str) -> Vec<f64> {
    text.lines()
        .skip_while(|l| !l.starts_with("packet,"))
        .skip(1)
        .take_while(|l| !l.starts_with("---"))
        .filter_map(|l| l.rsplit(',').next()?.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sockperf_full_log() {
        let text = "sockperf: ---> <MIN> observation =    6.024\n------------------------------\npacket, txTime(sec), rxTime(sec), rtt(usec)\n0, 2.431287818, 2.431294527, 6.709\n1, 2.431294549, 2.431301509, 6.960\n------------------------------\n";
        assert_eq!(super::parse_full_log(text), vec![6.709, 6.960]);
    }
}
