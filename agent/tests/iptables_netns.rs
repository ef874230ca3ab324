//! The rendered rules are accepted by the real iptables-restore, and the
//! iptables dataplane's whole life (first sync, hooks, no-op resync, partial
//! update, repair after a flush, stale chains of an earlier run) works in
//! both nft and legacy mode, inside network namespaces this test creates
//! (removed even on failure). Needs root; otherwise it says "skipped" and why.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use weft_agent::dataplane::fixtures;
use weft_agent::dataplane::iptables::{render, restore_input, Ruleset};
use weft_agent::dataplane::netfilter::{IptablesDataplane, Mode, CANARY};
use weft_agent::dataplane::ServiceDataplane;
use weft_model::view::{FrontendPort, Protocol, ServiceType};
use weft_model::{Backend, BackendPort, ServiceEntry};

mod common;
use common::Netns;

fn restore(ns: &str, input: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn entry(
    name: &str,
    backends: &[(&str, &str, bool)],
    etp_local: bool,
    affinity: Option<u32>,
) -> ServiceEntry {
    ServiceEntry {
        namespace: "default".into(),
        name: name.into(),
        service_type: ServiceType::NodePort,
        cluster_ips: vec![format!("198.19.0.{}", 20 + name.len()).parse().unwrap()],
        ports: vec![
            FrontendPort {
                name: "http".into(),
                protocol: Protocol::TCP,
                port: 80,
                node_port: Some(30000 + name.len() as u16),
            },
            FrontendPort {
                name: "dns".into(),
                protocol: Protocol::UDP,
                port: 53,
                node_port: None,
            },
        ],
        affinity_timeout: affinity,
        external_local: etp_local,
        backends: backends
            .iter()
            .map(|(ip, node, ready)| Backend {
                ip: ip.parse().unwrap(),
                node: Some(node.to_string()),
                hostname: None,
                target: None,
                zone: None,
                ports: vec![
                    BackendPort {
                        name: "http".into(),
                        protocol: Protocol::TCP,
                        port: 8080,
                    },
                    BackendPort {
                        name: "dns".into(),
                        protocol: Protocol::UDP,
                        port: 5353,
                    },
                ],
                ready: *ready,
                serving: *ready,
                terminating: false,
            })
            .collect(),
        ..Default::default()
    }
}

fn rules(services: Vec<ServiceEntry>) -> Ruleset {
    render(&fixtures::plan(services), fixtures::CLUSTER_CIDR)
}

#[test]
fn iptables_restore_accepts_full_and_partial_updates() {
    let ns = match Netns::create("ipt") {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot create a network namespace: {why}");
            return;
        }
    };
    let a = rules(vec![
        entry(
            "web",
            &[
                ("198.18.128.5", "node-1", true),
                ("198.18.129.5", "node-2", true),
            ],
            false,
            Some(30),
        ),
        entry("local", &[("198.18.128.6", "node-1", true)], true, None),
        entry("remote", &[("198.18.129.6", "node-2", true)], true, None),
        entry("none", &[], false, None),
    ]);
    let full = restore_input(&Ruleset::default(), &a).unwrap();
    restore(&ns.0, &full).unwrap_or_else(|e| panic!("full restore rejected: {e}\n{full}"));
    let b = rules(vec![
        entry(
            "web",
            &[
                ("198.18.128.5", "node-1", true),
                ("198.18.129.9", "node-2", true),
            ],
            false,
            Some(30),
        ),
        entry("local", &[("198.18.128.6", "node-1", true)], true, None),
        entry("remote", &[("198.18.129.6", "node-2", true)], true, None),
    ]);
    let partial = restore_input(&a, &b).unwrap();
    restore(&ns.0, &partial).unwrap_or_else(|e| panic!("partial restore rejected: {e}\n{partial}"));
    let listed = Command::new("ip")
        .args(["netns", "exec", &ns.0, "iptables", "-t", "nat", "-S"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("198.18.129.9:8080"), "{listed}");
    assert!(
        !listed.contains("198.18.129.5:8080"),
        "the removed endpoint's chain is gone: {listed}"
    );
    let filter = Command::new("ip")
        .args(["netns", "exec", &ns.0, "iptables", "-S", "WEFT-SERVICES"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&filter.stdout).contains("REJECT"),
        "the deleted Service's REJECT is gone"
    );
}

/// An SCTP port next to the TCP and UDP ones of [`entry`].
fn with_sctp(mut e: ServiceEntry) -> ServiceEntry {
    e.ports.push(FrontendPort {
        name: "sctp".into(),
        protocol: Protocol::SCTP,
        port: 3868,
        node_port: None,
    });
    for b in &mut e.backends {
        b.ports.push(BackendPort {
            name: "sctp".into(),
            protocol: Protocol::SCTP,
            port: 3868,
        });
    }
    e
}

#[test]
fn iptables_dataplane_lifecycle_in_both_modes() {
    for mode in [Mode::Nft, Mode::Legacy] {
        let ns = match Netns::create(&format!("ipd-{}", mode.as_str())) {
            Ok(ns) => ns,
            Err(why) => {
                eprintln!("skipped: cannot create a network namespace: {why}");
                return;
            }
        };
        let save = mode.tool("iptables-save");
        // "web" (TCP, UDP, SCTP; affinity) with its second endpoint at `second`,
        // "local" (ETP Local), and optionally "none" (no endpoints: REJECT).
        let plan = |second: &str, with_none: bool| {
            let mut services = vec![
                with_sctp(entry(
                    "web",
                    &[("198.18.128.5", "node-1", true), (second, "node-2", true)],
                    false,
                    Some(30),
                )),
                entry("local", &[("198.18.128.6", "node-1", true)], true, None),
            ];
            if with_none {
                services.push(entry("none", &[], false, None));
            }
            fixtures::plan(services)
        };
        let (one, two) = (plan("198.18.129.5", true), plan("198.18.129.9", false));
        let (first, again, update, damage, repaired) = ns.run(move || {
            let mut dp = IptablesDataplane::new(mode, fixtures::CLUSTER_CIDR);
            dp.conntrack = false;
            let first = dp.apply(&one, BTreeMap::new()).expect("first apply");
            let again = dp.apply(&one, BTreeMap::new()).expect("second apply");
            let update = dp.apply(&two, BTreeMap::new()).expect("update");
            assert_eq!(dp.check(), None, "nothing damaged yet");
            let flush = Command::new(mode.tool("iptables"))
                .args(["-t", "nat", "-F"])
                .status()
                .unwrap();
            assert!(flush.success());
            let damage = dp.check();
            let repaired = dp.apply(&two, BTreeMap::new()).expect("repair");
            (first, again, update, damage, repaired)
        });
        let m = mode.as_str();
        assert!(first.full && first.chains > 10, "{m}: {first:?}");
        assert_eq!(
            again.chains, 0,
            "{m}: an unchanged plan rewrites nothing: {again:?}"
        );
        assert!(
            !update.full && update.chains > 0 && update.chains < first.chains / 2,
            "{m}: only the changed chains (per port of web: its SVC, the new and the old SEP; filter WEFT-SERVICES): {update:?} vs {first:?}"
        );
        assert!(
            damage.is_some_and(|d| d.contains(CANARY)),
            "{m}: the flush is noticed"
        );
        assert!(repaired.full, "{m}: {repaired:?}");
        let nat = ns.exec(&[&save, "-t", "nat"]);
        for want in [
            "-A PREROUTING -m comment --comment \"weft service portals\" -j WEFT-SERVICES",
            "-A OUTPUT -m comment --comment \"weft service portals\" -j WEFT-SERVICES",
            "-A POSTROUTING -m comment --comment \"weft service SNAT\" -j WEFT-SNAT",
            "198.18.129.9:8080",
            "-p sctp -m sctp --dport 3868",
        ] {
            assert!(
                nat.contains(want),
                "{m}: {want:?} missing after the repair:\n{nat}"
            );
        }
        assert!(
            !nat.contains("198.18.129.5:8080"),
            "{m}: the removed endpoint's chain is gone"
        );
        let pre: Vec<&str> = nat
            .lines()
            .filter(|l| l.starts_with("-A PREROUTING"))
            .collect();
        assert!(
            pre.len() == 2
                && pre[0].ends_with("WEFT-SERVICES")
                && pre[1].ends_with("WEFT-HOSTPORTS"),
            "{m}: {pre:?}"
        );
        // A new agent (a restart) with a smaller plan removes the chains it no longer wants.
        let (restart, stale) = ns.run(move || {
            let mut dp = IptablesDataplane::new(mode, fixtures::CLUSTER_CIDR);
            dp.conntrack = false;
            let r = dp
                .apply(&fixtures::plan(vec![]), BTreeMap::new())
                .expect("restart");
            let stale = Command::new(mode.tool("iptables-save")).output().unwrap();
            (r, String::from_utf8_lossy(&stale.stdout).into_owned())
        });
        assert!(restart.full, "{m}");
        assert!(
            !stale.contains("WEFT-SVC-") && !stale.contains("WEFT-SEP-"),
            "{m}: stale chains left:\n{stale}"
        );
        assert_eq!(
            stale.matches("-j WEFT-SERVICES").count(),
            5, // nat PREROUTING and OUTPUT, filter INPUT, FORWARD and OUTPUT
            "{m}: hooks not duplicated:\n{stale}"
        );
        println!(
            "{m}: first sync {} chains, update {} chains, flush repaired",
            first.chains, update.chains
        );
    }
}
