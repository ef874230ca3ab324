//! The rendered rules are accepted by the real iptables-restore, inside a
//! network namespace this test creates (removed even on failure). Needs root;
//! otherwise it says "skipped" and why.

use std::io::Write;
use std::process::{Command, Stdio};
use weft_agent::dataplane::fixtures;
use weft_agent::dataplane::iptables::{render, restore_input, Ruleset};
use weft_model::view::{FrontendPort, Protocol, ServiceType};
use weft_model::{Backend, BackendPort, ServiceEntry};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

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
    let name = format!("wipt-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: cannot create a network namespace (not root?)");
        return;
    }
    let ns = Netns(name);
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
