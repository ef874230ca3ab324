//! `cargo xtask bench <name> [ARGS...]`: build in release and run a benchmark.

use crate::util;
use anyhow::{bail, Result};
use std::process::Command;

struct Bench {
    name: &'static str,
    about: &'static str,
    /// Packages to build with `cargo build --release -p ...`.
    packages: &'static [&'static str],
    /// Binary under target/release/ to run with the extra arguments.
    binary: &'static str,
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "push",
        about: "control-plane push stream fan-out (weft-push-bench)",
        packages: &["weft-control", "weft-e2e"],
        binary: "weft-push-bench",
    },
    Bench {
        name: "cni",
        about: "CNI ADD/DEL latency, weft vs reference bridge+host-local; parallel ADDs (weft-cni-bench, root)",
        packages: &["weft-cni", "weft-e2e"],
        binary: "weft-cni-bench",
    },
    Bench {
        name: "overlay",
        about: "pod-to-pod TCP throughput, VXLAN overlay vs plain veth, iperf3 (weft-overlay-bench, root)",
        // the overlay is the weft-agent library, built as weft-e2e's dependency
        packages: &["weft-e2e"],
        binary: "weft-overlay-bench",
    },
    Bench {
        name: "services",
        about: "service programming at 1k/5k/10k Services: iptables (weft vs a kube-proxy-shaped restore, nft and legacy) and eBPF (full sync, one change, map writes); connect and sockperf request/response latency via a cluster IP vs the pod IP (weft-services-bench, root)",
        // the dataplane is the weft-agent library, built as weft-e2e's dependency
        packages: &["weft-e2e"],
        binary: "weft-services-bench",
    },
    Bench {
        name: "dns",
        about: "cluster DNS: weft-dns vs NSD and Knot serving the same records (1,000 Services), dnsperf peak qps and latency at 50% of peak with the server pinned to one CPU; memory at 10k Services / 100k pods (weft-dns-bench)",
        // the server under test is the weft-dns binary, run by the bench
        packages: &["weft-dns", "weft-e2e"],
        binary: "weft-dns-bench",
    },
];

/// The benchmarks, one per line, for help and errors.
pub fn list() -> String {
    BENCHES
        .iter()
        .map(|b| format!("  {:<8} {}", b.name, b.about))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn run(name: &str, args: &[String]) -> Result<()> {
    let Some(bench) = BENCHES.iter().find(|b| b.name == name) else {
        bail!(
            "unknown benchmark {name:?}; available:\n{}\n(e.g. `cargo xtask bench push --services 10000 --endpoints 10 --agents 1000 --updates 100`)",
            list()
        );
    };
    let mut build = util::cargo();
    build.args(["build", "--release"]);
    for p in bench.packages {
        build.args(["-p", p]);
    }
    util::run(&mut build)?;
    let bin = util::target_dir().join("release").join(bench.binary);
    if !bin.exists() {
        bail!(
            "{} was not built by `{}`",
            bin.display(),
            util::display(&build)
        );
    }
    let mut cmd = Command::new(&bin);
    cmd.args(args).current_dir(util::root());
    util::run(&mut cmd)
}
