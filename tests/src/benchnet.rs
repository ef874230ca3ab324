//! Network-namespace helpers of the privileged benchmarks (`weft-cni-bench`,
//! `weft-overlay-bench`): named namespaces removed by a drop guard, `ip`
//! and `ip netns exec` wrappers, and running code on a thread that entered
//! a namespace.

use anyhow::{bail, Context};
use std::os::fd::AsRawFd;
use std::process::Command;

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
