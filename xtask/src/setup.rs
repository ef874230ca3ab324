//! `cargo xtask setup`: install what the project needs on a fresh Debian 12
//! machine, idempotently; `setup --check` only reports (the doctor).

use crate::util;
use anyhow::{bail, Context, Result};
use std::process::Command;

/// Debian packages the tests, the demo, the dataplanes and the eBPF build
/// use, with a program each provides, or for libraries an absolute path to a
/// file each installs (to recognise it where dpkg is absent).
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iptables", "iptables"),
    ("nftables", "nft"),
    ("conntrack", "conntrack"),
    ("bpftool", "bpftool"),
    ("procps", "ps"),
    ("curl", "curl"),
    ("iputils-ping", "ping"),
    // `cargo xtask bench overlay` (throughput, offloads) and `bench cni`
    // (the reference bridge + host-local plugins it compares against).
    ("iperf3", "iperf3"),
    ("ethtool", "ethtool"),
    // The eBPF dataplane's restart test (HTTP load through a ClusterIP while
    // the agent is killed) and `bench services` request/response latency.
    ("wrk", "wrk"),
    ("sockperf", "sockperf"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    // `cargo xtask bench dns`: dnsperf drives weft-dns, NSD and Knot (the
    // peers serve the same records as a static zone; the bench starts its own
    // instances on loopback with its own configs, never the packages'
    // services); dig checks answers there and in the DNS e2e tests.
    ("dnsperf", "dnsperf"),
    ("nsd", "/usr/sbin/nsd"),
    ("knot", "/usr/sbin/knotd"),
    ("bind9-dnsutils", "dig"),
    // The podman e2e test: a real runtime calling weft-cni
    // (shared/runtimes/ci-recipe.sh; runc, not crun, on this hybrid cgroup host).
    ("podman", "podman"),
    ("runc", "runc"),
    ("conmon", "conmon"),
    ("busybox-static", "/bin/busybox"),
    ("jq", "jq"),
    // bpf-linker is built against Debian's LLVM 22, the LLVM of the pinned
    // rustc (they must share the major version).
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
];

/// Packages without which the tests cannot run at all.
const REQUIRED: &[&str] = &["iproute2"];

/// rustup components of the pinned toolchain. rust-src: the eBPF crate is
/// built with `-Z build-std=core` (agent/build.rs).
pub const COMPONENTS: &[&str] = &["rustfmt", "clippy", "rust-src"];

/// bpf-linker links the eBPF crate; this version works with aya-ebpf 0.2.1
/// and LLVM 22 (its default feature is llvm-23, absent here).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where bpf-linker's build finds LLVM.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// cargo-fuzz runs dns/fuzz in `cargo xtask test`, on the pinned stable
/// toolchain (`--sanitizer none` needs no nightly).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ok,
    Installed,
    Missing,
}

struct Report {
    lines: Vec<(State, String)>,
}

impl Report {
    fn add(&mut self, state: State, item: impl Into<String>) {
        let item = item.into();
        match state {
            State::Ok => println!("ok   {item}"),
            State::Installed => println!("installed {item}"),
            State::Missing => println!("missing {item}"),
        }
        self.lines.push((state, item));
    }

    fn missing(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(s, _)| *s == State::Missing)
            .map(|(_, i)| i.as_str())
            .collect()
    }
}

/// Run setup (install what is missing), or with `check` only report and
/// fail when something is missing.
pub fn run(check: bool) -> Result<()> {
    let mut report = Report { lines: Vec::new() };
    let apt_ok = apt(check, &mut report)?;
    let rust_ok = components(check, &mut report)?;
    let linker_ok = bpf_linker(check, &mut report)?;
    let fuzz_ok = cargo_fuzz(check, &mut report)?;
    let missing = report.missing();
    if check {
        if !missing.is_empty() {
            bail!(
                "missing: {} (run `cargo xtask setup` as root to install)",
                missing.join(", ")
            );
        }
        println!("setup: everything is in place");
        return Ok(());
    }
    let fatal: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|m| REQUIRED.contains(m))
        .collect();
    if !fatal.is_empty() {
        bail!(
            "missing {} which the tests need; install it as root: \
             apt-get update && apt-get install -y --no-install-recommends {}",
            fatal.join(", "),
            fatal.join(" ")
        );
    }
    if !(apt_ok && rust_ok && linker_ok && fuzz_ok) {
        eprintln!(
            "setup: continuing without {} (see above for how to install)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Whether a Debian package is installed (`dpkg-query`), or, without dpkg,
/// whether the program it provides is on PATH.
fn package_present(pkg: &str, program: &str, have_dpkg: bool) -> bool {
    if have_dpkg {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output();
        return out.is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim() == "install ok installed"
        });
    }
    if program.starts_with('/') {
        return std::path::Path::new(program).exists();
    }
    util::on_path(program)
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(program).exists())
}

/// Check (and unless `check`, install) the apt packages. Returns whether all are present.
fn apt(check: bool, report: &mut Report) -> Result<bool> {
    let have_dpkg = util::on_path("dpkg-query");
    let present: Vec<bool> = APT_PACKAGES
        .iter()
        .map(|(pkg, program)| package_present(pkg, program, have_dpkg))
        .collect();
    let missing: Vec<(&str, &str)> = APT_PACKAGES
        .iter()
        .zip(&present)
        .filter(|(_, p)| !**p)
        .map(|(item, _)| *item)
        .collect();
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    let can_install = util::is_root() && util::on_path("apt-get");
    if missing.is_empty() || check || !can_install {
        // Report in list order.
        for ((pkg, _), ok) in APT_PACKAGES.iter().zip(&present) {
            report.add(if *ok { State::Ok } else { State::Missing }, *pkg);
        }
        if missing.is_empty() {
            return Ok(true);
        }
        let why = if check {
            "to install"
        } else if !util::on_path("apt-get") {
            "apt-get is not available here; install the equivalent packages, on Debian"
        } else {
            "not root; as root"
        };
        eprintln!(
            "  {why}: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            names.join(" ")
        );
        return Ok(false);
    }
    for ((pkg, _), ok) in APT_PACKAGES.iter().zip(&present) {
        if *ok {
            report.add(State::Ok, *pkg);
        }
    }
    util::run(Command::new("apt-get").arg("update"))?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&names);
    util::run(&mut install)?;
    let mut still = Vec::new();
    for (pkg, program) in &missing {
        if package_present(pkg, program, have_dpkg) {
            report.add(State::Installed, *pkg);
        } else {
            report.add(State::Missing, *pkg);
            still.push(*pkg);
        }
    }
    if !still.is_empty() {
        bail!(
            "apt-get install finished but {} still not installed",
            still.join(", ")
        );
    }
    Ok(true)
}

/// The toolchain channel pinned in rust-toolchain.toml.
pub fn pinned_toolchain() -> Result<String> {
    let path = util::root().join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .with_context(|| format!("{} has no `channel = \"...\"`", path.display()))
}

/// Check (and unless `check`, add) the rustup components. Returns whether all are present.
fn components(check: bool, report: &mut Report) -> Result<bool> {
    let toolchain = pinned_toolchain()?;
    if !util::on_path("rustup") {
        for c in COMPONENTS {
            report.add(State::Missing, format!("{c} ({toolchain})"));
        }
        eprintln!(
            "  rustup is not on PATH; install rustup, then: rustup component add --toolchain {toolchain} {}",
            COMPONENTS.join(" ")
        );
        return Ok(false);
    }
    let installed = installed_components(&toolchain)?;
    let has = |c: &str| {
        installed
            .iter()
            .any(|i| i == c || i.strip_prefix(c).is_some_and(|r| r.starts_with('-')))
    };
    let missing: Vec<&str> = COMPONENTS.iter().copied().filter(|c| !has(c)).collect();
    for c in COMPONENTS.iter().filter(|c| has(c)) {
        report.add(State::Ok, format!("{c} ({toolchain})"));
    }
    if missing.is_empty() {
        return Ok(true);
    }
    if check {
        for c in &missing {
            report.add(State::Missing, format!("{c} ({toolchain})"));
        }
        eprintln!(
            "  to install: rustup component add --toolchain {toolchain} {}",
            missing.join(" ")
        );
        return Ok(false);
    }
    util::run(
        Command::new("rustup")
            .args(["component", "add", "--toolchain", &toolchain])
            .args(&missing),
    )?;
    let now = installed_components(&toolchain)?;
    for c in &missing {
        let ok = now
            .iter()
            .any(|i| i == c || i.strip_prefix(c).is_some_and(|r| r.starts_with('-')));
        if !ok {
            bail!("rustup component add finished but {c} is still not installed for {toolchain}");
        }
        report.add(State::Installed, format!("{c} ({toolchain})"));
    }
    Ok(true)
}

fn installed_components(toolchain: &str) -> Result<Vec<String>> {
    let out = util::capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    Ok(out.lines().map(|l| l.trim().to_string()).collect())
}

/// `program --version`'s output, if it runs.
fn tool_version(program: &str) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether a `--version` line names exactly `version`.
fn has_version(found: Option<&str>, version: &str) -> bool {
    found.is_some_and(|v| v.split_whitespace().any(|w| w == version))
}

/// Check (and unless `check`, `cargo install`) bpf-linker at
/// [`BPF_LINKER_VERSION`], built against Debian's LLVM 22. Returns whether it is in place.
fn bpf_linker(check: bool, report: &mut Report) -> Result<bool> {
    let mut install = util::cargo();
    install.env("LLVM_PREFIX", LLVM_PREFIX).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    let llvm = std::path::Path::new(LLVM_PREFIX).join("bin/llvm-config");
    let first = (!llvm.exists())
        .then_some("install llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev (as root)");
    // About 1-2 minutes on two cores.
    cargo_tool(
        check,
        report,
        "bpf-linker",
        BPF_LINKER_VERSION,
        install,
        first,
    )
}

/// Check (and unless `check`, `cargo install`) cargo-fuzz at
/// [`CARGO_FUZZ_VERSION`]. Returns whether it is in place.
fn cargo_fuzz(check: bool, report: &mut Report) -> Result<bool> {
    let mut install = util::cargo();
    install.args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]);
    // About 1.5 minutes on two cores.
    cargo_tool(
        check,
        report,
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        install,
        None,
    )
}

/// A tool `cargo install`ed at a pinned `version` (a word of its
/// `--version` line): in place, or installed with `install` — unless
/// `check`, or unless `first` names what must be installed before it can
/// build; then it says how to install it. Returns whether it is in place.
fn cargo_tool(
    check: bool,
    report: &mut Report,
    program: &str,
    version: &str,
    mut install: Command,
    first: Option<&str>,
) -> Result<bool> {
    let item = format!("{program} {version}");
    let found = tool_version(program);
    if has_version(found.as_deref(), version) {
        report.add(State::Ok, item);
        return Ok(true);
    }
    if check || first.is_some() {
        report.add(State::Missing, item);
        let have = found.map_or_else(|| "not on PATH".to_string(), |v| format!("found {v}"));
        eprintln!(
            "  {program}: {have}; to install: {}",
            install_hint(&install, first)
        );
        return Ok(false);
    }
    util::run(&mut install)?;
    let now = tool_version(program);
    if !has_version(now.as_deref(), version) {
        bail!(
            "cargo install finished but `{program} --version` gives {} \
             (is ~/.cargo/bin on PATH, ahead of any other {program}?)",
            now.as_deref().unwrap_or("nothing")
        );
    }
    report.add(State::Installed, item);
    Ok(true)
}

/// How to run `install` by hand (with the environment it sets), after `first`.
fn install_hint(install: &Command, first: Option<&str>) -> String {
    let first = first.map_or_else(String::new, |f| format!("{f}, then "));
    let env: String = install
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={} ", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    format!("{first}{env}{}", util::display(install))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_pinned_tools() {
        let linker = |v| has_version(v, BPF_LINKER_VERSION);
        assert!(linker(Some("bpf-linker 0.13.0")));
        assert!(!linker(Some("bpf-linker 0.13.01")));
        assert!(!linker(Some("bpf-linker 0.9.15")));
        assert!(!linker(None));
        // What `cargo-fuzz --version` prints.
        assert!(has_version(Some("cargo-fuzz 0.13.2"), CARGO_FUZZ_VERSION));
    }

    #[test]
    fn a_missing_tool_is_only_reported_when_checking_or_blocked() {
        for (check, first) in [(true, None), (false, Some("install its LLVM"))] {
            let mut report = Report { lines: Vec::new() };
            // Running it would fail the call: it must not run.
            let install = Command::new("false");
            let ok = cargo_tool(
                check,
                &mut report,
                "weft-no-such-tool",
                "1.0",
                install,
                first,
            );
            assert!(!ok.unwrap());
            assert_eq!(report.missing(), ["weft-no-such-tool 1.0"]);
        }
        let mut install = Command::new("cargo");
        install
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker"]);
        assert_eq!(
            install_hint(&install, Some("install llvm-22-dev")),
            "install llvm-22-dev, then LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker"
        );
    }
}
