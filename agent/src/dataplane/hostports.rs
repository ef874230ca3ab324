//! CNI `portMappings` (hostPort): DNAT rules that match only local destinations.
//!
//! The CNI plugin validates a pod's `runtimeConfig.portMappings` and records
//! them in the pod's IPAM claim (`portMapping=tcp/8080/80[/hostIP]` lines,
//! docs/cni.md); this module reads those claims ([`read`]), renders the nat
//! chains in iptables-restore rule syntax ([`render`], the style of
//! [`super::iptables::render`]) and answers what a packet hits ([`trace`]).
//! Pure apart from reading the claim directory.
//!
//! - `WEFT-HOSTPORTS` holds one rule per mapping: `-d <hostIP>/32` when the
//!   mapping names a host IP, otherwise `-m addrtype --dst-type LOCAL`, so a
//!   hostPort only ever catches traffic addressed to this node, never traffic
//!   the node forwards. Mappings with a host IP come first, so one pod may
//!   map a port on one address and the same port on every other address.
//! - `WEFT-HP-<hash>` per mapping: masquerade the pod's own connections
//!   (hairpin: it reached itself through the node) and connections from
//!   127.0.0.0/8, then DNAT to `podIP:containerPort`. Both marks use
//!   `WEFT-MARK-MASQ` and the `WEFT-SNAT` masquerade of the Service rules.
//!   A localhost connection can only leave through the pod bridge with
//!   `route_localnet` on that device; weft never sets it globally.
//! - `WEFT-HOSTPORTS` is jumped to from PREROUTING and OUTPUT *after*
//!   `WEFT-SERVICES`: a DNAT there ends nat traversal for the connection, so
//!   a hostPort can never shadow a ClusterIP, external IP or NodePort.
//!
//! Conflicts follow the scheduler's hostPort rule: two pods clash on the same
//! protocol and port when their host IPs are equal or either is "every
//! address". The claim written first (file modification time, then pod IP)
//! keeps the port, so a new pod never takes a port from a running one; the
//! other mapping is reported and not programmed.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use super::iptables::{hash, proto};
use weft_model::node_state::{Claim, PortMapping};
use weft_model::view::Protocol;

/// The chain the nat hooks jump to.
pub const CHAIN: &str = "WEFT-HOSTPORTS";

/// One programmed hostPort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub pod_ip: IpAddr,
    /// `None`: every local address of the node.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// `namespace/name`, or the name, or the container ID: whatever the
    /// runtime told the plugin.
    pub pod: String,
}

/// What [`read`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostPorts {
    /// The mappings to program, in rule order.
    pub ports: Vec<HostPort>,
    /// One line per mapping that is not programmed, saying why (a conflict
    /// with an earlier pod, or a host IP of the other address family).
    pub conflicts: Vec<String>,
}

/// The hostPorts recorded in the plugin's claims in `ipam_dir` (the network's
/// directory, `<ipamDir>/<network>`, as for `local_api::claims`). Files that
/// cannot be read or decoded are skipped; a missing directory is no ports.
pub fn read(ipam_dir: &Path) -> HostPorts {
    let Ok(dir) = std::fs::read_dir(ipam_dir) else {
        return HostPorts::default();
    };
    let mut claims = Vec::new();
    for e in dir.flatten() {
        // Claims are named by their address; `lock`, `last_reserved` and
        // `.tmp-*` are not addresses.
        let Ok(ip) = e.file_name().to_string_lossy().parse::<IpAddr>() else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Some(claim) = Claim::decode(&text) else {
            continue;
        };
        if claim.port_mappings.is_empty() {
            continue;
        }
        let written = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        claims.push((written, ip, claim));
    }
    collect(claims)
}

/// The pure part of [`read`]: claims as `(written, pod IP, claim)`.
fn collect(mut claims: Vec<(SystemTime, IpAddr, Claim)>) -> HostPorts {
    claims.sort_by_key(|(written, ip, _)| (*written, *ip));
    let mut out = HostPorts::default();
    for (_, pod_ip, claim) in &claims {
        let pod = pod_label(claim);
        for m in &claim.port_mappings {
            if m.host_ip.is_some_and(|h| h.is_ipv4() != pod_ip.is_ipv4()) {
                out.conflicts.push(format!(
                    "{pod} ({pod_ip}) hostPort {m}: the host IP is not of the pod IP's family"
                ));
                continue;
            }
            let clash = out.ports.iter().find(|k| {
                k.protocol == m.protocol
                    && k.host_port == m.host_port
                    && if k.pod_ip == *pod_ip {
                        k.host_ip == m.host_ip
                    } else {
                        k.host_ip.is_none() || m.host_ip.is_none() || k.host_ip == m.host_ip
                    }
            });
            if let Some(k) = clash {
                out.conflicts.push(format!(
                    "{pod} ({pod_ip}) hostPort {m}: conflicts with {} ({}) hostPort {}, claimed earlier",
                    k.pod,
                    k.pod_ip,
                    mapping(k)
                ));
                continue;
            }
            out.ports.push(HostPort {
                pod_ip: *pod_ip,
                host_ip: m.host_ip,
                host_port: m.host_port,
                container_port: m.container_port,
                protocol: m.protocol,
                pod: pod.clone(),
            });
        }
    }
    out.ports.sort_by(rule_order);
    out
}

fn pod_label(c: &Claim) -> String {
    match (&c.pod.namespace, &c.pod.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => c.container_id.clone(),
    }
}

fn mapping(p: &HostPort) -> PortMapping {
    PortMapping {
        protocol: p.protocol,
        host_port: p.host_port,
        container_port: p.container_port,
        host_ip: p.host_ip,
    }
}

/// Rule order in `WEFT-HOSTPORTS`, and so the order [`trace`] matches in:
/// mappings with a host IP before those on every address.
fn rule_order(a: &HostPort, b: &HostPort) -> Ordering {
    let key = |p: &HostPort| {
        (
            p.host_ip.is_none(),
            p.protocol,
            p.host_port,
            p.host_ip,
            p.pod_ip,
            p.container_port,
        )
    };
    key(a).cmp(&key(b))
}

fn ordered(ports: &[HostPort]) -> Vec<&HostPort> {
    let mut v: Vec<&HostPort> = ports.iter().collect();
    v.sort_by(|a, b| rule_order(a, b));
    v
}

/// The per-mapping chain: `WEFT-HP-` + 16 hex digits (24 characters).
pub fn chain_name(p: &HostPort) -> String {
    let host = p
        .host_ip
        .map_or_else(|| "*".to_string(), |ip| ip.to_string());
    format!(
        "WEFT-HP-{}",
        hash(&format!(
            "{}/{host}:{}>{}:{}",
            proto(p.protocol),
            p.host_port,
            p.pod_ip,
            p.container_port
        ))
    )
}

fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

/// The pod label as a comment: it comes from the runtime, so anything that
/// could end the quoted word or the rule is replaced.
fn comment(p: &HostPort) -> String {
    let pod: String = p
        .pod
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-/:@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("\"{pod} hostport {}\"", p.host_port)
}

/// The nat chains for `ports` (rules without `-A CHAIN`): `WEFT-HOSTPORTS`,
/// always present, and one `WEFT-HP-*` per mapping. The rules are IPv4 or
/// IPv6 by the pod's address; weft's pods are IPv4 today, all for iptables.
pub fn render(ports: &[HostPort]) -> BTreeMap<String, Vec<String>> {
    let mut chains = BTreeMap::new();
    let mut entry = Vec::new();
    for p in ordered(ports) {
        let chain = chain_name(p);
        let pr = proto(p.protocol);
        let dst = match p.host_ip {
            Some(ip) => format!(
                "-d {} -p {pr} -m {pr} --dport {}",
                host_cidr(ip),
                p.host_port
            ),
            None => format!(
                "-p {pr} -m {pr} --dport {} -m addrtype --dst-type LOCAL",
                p.host_port
            ),
        };
        entry.push(format!(
            "{dst} -m comment --comment {} -j {chain}",
            comment(p)
        ));
        let (loopback, to) = match p.pod_ip {
            IpAddr::V4(ip) => ("127.0.0.0/8", format!("{ip}:{}", p.container_port)),
            IpAddr::V6(ip) => ("::1/128", format!("[{ip}]:{}", p.container_port)),
        };
        chains.insert(
            chain,
            vec![
                format!("-s {} -j WEFT-MARK-MASQ", host_cidr(p.pod_ip)),
                format!("-s {loopback} -j WEFT-MARK-MASQ"),
                format!("-p {pr} -m {pr} -j DNAT --to-destination {to}"),
            ],
        );
    }
    chains.insert(CHAIN.to_string(), entry);
    chains
}

/// The hostPort a new connection to `dst` (`dst_is_local`: an address of
/// this node, 127.0.0.0/8 included) on `protocol`/`port` is translated by,
/// if any — given that no Service rule took it first (`WEFT-SERVICES` runs
/// before). A mapping with a host IP matches that address alone, local or
/// not, as its rule does.
pub fn trace(
    ports: &[HostPort],
    dst: IpAddr,
    dst_is_local: bool,
    protocol: Protocol,
    port: u16,
) -> Option<&HostPort> {
    ordered(ports).into_iter().find(|p| {
        p.protocol == protocol
            && p.host_port == port
            && match p.host_ip {
                Some(ip) => ip == dst,
                None => dst_is_local,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use weft_model::node_state::PodRef;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pm(
        protocol: Protocol,
        host_port: u16,
        container_port: u16,
        host_ip: Option<&str>,
    ) -> PortMapping {
        PortMapping {
            protocol,
            host_port,
            container_port,
            host_ip: host_ip.map(ip),
        }
    }

    fn claim(name: &str, mappings: Vec<PortMapping>) -> Claim {
        Claim {
            container_id: format!("cid-{name}"),
            ifname: "eth0".into(),
            netns: None,
            pod: PodRef {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                uid: None,
            },
            port_mappings: mappings,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn hp(
        pod: &str,
        pod_ip: &str,
        host_ip: Option<&str>,
        host_port: u16,
        container_port: u16,
    ) -> HostPort {
        HostPort {
            pod_ip: ip(pod_ip),
            host_ip: host_ip.map(ip),
            host_port,
            container_port,
            protocol: Protocol::TCP,
            pod: pod.into(),
        }
    }

    /// A claim directory in the system temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            let p =
                std::env::temp_dir().join(format!("weft-hostports-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn write(&self, name: &str, text: &str, written: SystemTime) {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(written)
                .unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_the_plugins_claims_and_skips_the_rest() {
        let dir = TempDir::new("read");
        // What the plugin writes, also in the pre-hostPort format.
        dir.write(
            "198.18.128.5",
            &claim("web-0", vec![pm(Protocol::TCP, 8080, 80, None)]).encode(),
            at(10),
        );
        dir.write(
            "198.18.128.6",
            "cid-old\neth0\npodNamespace=shop\npodName=old\n",
            at(5),
        );
        dir.write(
            "198.18.128.7",
            "cid-podman\neth0\npodName=box\nportMapping=udp/5353/53/198.18.0.11\n",
            at(20),
        );
        dir.write(
            "198.18.128.8",
            "cid-anon\neth0\nportMapping=sctp/9000/9000\n",
            at(30),
        );
        // Not claims, or not decodable: skipped.
        dir.write("lock", "", at(1));
        dir.write("last_reserved", "198.18.128.8", at(1));
        dir.write(
            ".tmp-198.18.128.9",
            "cid-x\neth0\nportMapping=tcp/1/1\n",
            at(1),
        );
        dir.write("198.18.128.10", "", at(1));
        std::fs::create_dir(dir.0.join("198.18.128.11")).unwrap();

        let got = read(&dir.0);
        assert!(got.conflicts.is_empty(), "{:?}", got.conflicts);
        let summary: Vec<(String, String, Option<IpAddr>, u16, u16, Protocol)> = got
            .ports
            .iter()
            .map(|p| {
                (
                    p.pod.clone(),
                    p.pod_ip.to_string(),
                    p.host_ip,
                    p.host_port,
                    p.container_port,
                    p.protocol,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                // host IP first, then every-address mappings by protocol and port
                (
                    "box".into(),
                    "198.18.128.7".into(),
                    Some(ip("198.18.0.11")),
                    5353,
                    53,
                    Protocol::UDP
                ),
                (
                    "shop/web-0".into(),
                    "198.18.128.5".into(),
                    None,
                    8080,
                    80,
                    Protocol::TCP
                ),
                (
                    "cid-anon".into(),
                    "198.18.128.8".into(),
                    None,
                    9000,
                    9000,
                    Protocol::SCTP
                ),
            ]
        );
        assert_eq!(read(&dir.0.join("missing")), HostPorts::default());
    }

    #[test]
    fn the_earliest_claim_keeps_a_contested_port() {
        let dir = TempDir::new("conflict");
        // b has the lower address but was written later: a keeps the port.
        dir.write(
            "198.18.128.9",
            &claim("a", vec![pm(Protocol::TCP, 8080, 80, None)]).encode(),
            at(1),
        );
        dir.write(
            "198.18.128.3",
            &claim(
                "b",
                vec![
                    pm(Protocol::TCP, 8080, 81, None),
                    pm(Protocol::UDP, 8080, 81, None),
                ],
            )
            .encode(),
            at(2),
        );
        let got = read(&dir.0);
        let kept: Vec<(&str, Protocol)> = got
            .ports
            .iter()
            .map(|p| (p.pod.as_str(), p.protocol))
            .collect();
        assert_eq!(
            kept,
            vec![("shop/a", Protocol::TCP), ("shop/b", Protocol::UDP)]
        );
        assert_eq!(got.conflicts.len(), 1, "{:?}", got.conflicts);
        let c = &got.conflicts[0];
        assert!(
            c.starts_with("shop/b (198.18.128.3) hostPort *:8080/tcp -> 81: conflicts with shop/a (198.18.128.9)"),
            "{c}"
        );
        // Deterministic: the same directory gives the same answer.
        assert_eq!(read(&dir.0), got);
    }

    #[test]
    fn overlap_rules_follow_the_scheduler() {
        let claims = vec![
            // a: one port on a node address and the same port everywhere else: fine.
            (
                at(1),
                ip("198.18.128.5"),
                claim(
                    "a",
                    vec![
                        pm(Protocol::TCP, 80, 8080, Some("198.18.0.11")),
                        pm(Protocol::TCP, 80, 8081, None),
                    ],
                ),
            ),
            // b: a specific address overlapped by a's every-address mapping.
            (
                at(2),
                ip("198.18.128.6"),
                claim("b", vec![pm(Protocol::TCP, 80, 80, Some("198.18.0.12"))]),
            ),
            // c: another address and port, plus an IPv6 host IP for an IPv4 pod.
            (
                at(3),
                ip("198.18.128.7"),
                claim(
                    "c",
                    vec![
                        pm(Protocol::TCP, 443, 443, Some("198.18.0.12")),
                        pm(Protocol::TCP, 444, 444, Some("fd00::12")),
                    ],
                ),
            ),
            // d: every address where c holds one: also a conflict.
            (
                at(4),
                ip("198.18.128.8"),
                claim("d", vec![pm(Protocol::TCP, 443, 443, None)]),
            ),
            // e: exactly a's specific mapping.
            (
                at(5),
                ip("198.18.128.9"),
                claim("e", vec![pm(Protocol::TCP, 80, 80, Some("198.18.0.11"))]),
            ),
        ];
        let got = collect(claims);
        let kept: Vec<(&str, Option<IpAddr>, u16)> = got
            .ports
            .iter()
            .map(|p| (p.pod.as_str(), p.host_ip, p.host_port))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("shop/a", Some(ip("198.18.0.11")), 80),
                ("shop/c", Some(ip("198.18.0.12")), 443),
                ("shop/a", None, 80),
            ]
        );
        let who: Vec<&str> = got
            .conflicts
            .iter()
            .map(|c| c.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            who,
            vec!["shop/b", "shop/c", "shop/d", "shop/e"],
            "{:?}",
            got.conflicts
        );
        assert!(
            got.conflicts[1].contains("not of the pod IP's family"),
            "{:?}",
            got.conflicts
        );
    }

    #[test]
    fn renders_the_entry_chain_and_one_chain_per_mapping() {
        let mut udp = hp("shop/dns", "198.18.128.6", Some("198.18.0.11"), 53, 5353);
        udp.protocol = Protocol::UDP;
        let ports = vec![hp("shop/web-0", "198.18.128.5", None, 8080, 80), udp];
        let chains = render(&ports);
        assert_eq!(chains.len(), 3);
        for name in chains.keys() {
            assert!(name.starts_with("WEFT-") && name.len() <= 28, "{name}");
        }
        let web = chain_name(&ports[0]);
        let dns = chain_name(&ports[1]);
        assert!(
            web.starts_with("WEFT-HP-") && web.len() == 24 && web != dns,
            "{web}"
        );
        assert_eq!(
            chains[CHAIN],
            vec![
                format!("-d 198.18.0.11/32 -p udp -m udp --dport 53 -m comment --comment \"shop/dns hostport 53\" -j {dns}"),
                format!("-p tcp -m tcp --dport 8080 -m addrtype --dst-type LOCAL -m comment --comment \"shop/web-0 hostport 8080\" -j {web}"),
            ]
        );
        assert_eq!(
            chains[&web],
            vec![
                "-s 198.18.128.5/32 -j WEFT-MARK-MASQ",
                "-s 127.0.0.0/8 -j WEFT-MARK-MASQ",
                "-p tcp -m tcp -j DNAT --to-destination 198.18.128.5:80",
            ]
        );
        assert_eq!(
            chains[&dns][2],
            "-p udp -m udp -j DNAT --to-destination 198.18.128.6:5353"
        );
        // Order of the input does not matter; the rules are stable.
        let mut reversed = ports.clone();
        reversed.reverse();
        assert_eq!(render(&reversed), chains);
        // Nothing to map: the entry chain still exists, empty.
        assert_eq!(render(&[]), BTreeMap::from([(CHAIN.to_string(), vec![])]));
    }

    #[test]
    fn runtime_strings_cannot_break_the_rule() {
        let p = hp("ns/evil\" -j ACCEPT #", "198.18.128.5", None, 80, 80);
        let rule = &render(std::slice::from_ref(&p))[CHAIN][0];
        assert_eq!(rule.matches('"').count(), 2, "{rule}");
        assert!(
            rule.contains("\"ns/evil__-j_ACCEPT__ hostport 80\""),
            "{rule}"
        );
    }

    #[test]
    fn ipv6_pods_render_for_ip6tables() {
        let p = hp("shop/v6", "fd00:128::5", Some("fd00::11"), 8080, 80);
        let chains = render(std::slice::from_ref(&p));
        assert!(
            chains[CHAIN][0].starts_with("-d fd00::11/128 -p tcp"),
            "{:?}",
            chains[CHAIN]
        );
        assert_eq!(
            chains[&chain_name(&p)],
            vec![
                "-s fd00:128::5/128 -j WEFT-MARK-MASQ",
                "-s ::1/128 -j WEFT-MARK-MASQ",
                "-p tcp -m tcp -j DNAT --to-destination [fd00:128::5]:80",
            ]
        );
    }

    #[test]
    fn trace_matches_local_destinations_and_host_ips_in_rule_order() {
        let mut udp = hp("shop/dns", "198.18.128.7", None, 8080, 53);
        udp.protocol = Protocol::UDP;
        let ports = vec![
            hp("shop/any", "198.18.128.5", None, 8080, 80),
            hp("shop/one", "198.18.128.6", Some("198.18.0.11"), 8080, 81),
            udp,
        ];
        let pod = |r: Option<&HostPort>| r.map(|p| p.pod.clone());
        let node_ip = ip("198.18.0.11");
        let other_node_ip = ip("198.18.0.12");
        // The mapping with the host IP wins for that address …
        assert_eq!(
            pod(trace(&ports, node_ip, true, Protocol::TCP, 8080)),
            Some("shop/one".into())
        );
        // … every other local address (localhost included) gets the wildcard.
        assert_eq!(
            pod(trace(&ports, other_node_ip, true, Protocol::TCP, 8080)),
            Some("shop/any".into())
        );
        assert_eq!(
            pod(trace(&ports, ip("127.0.0.1"), true, Protocol::TCP, 8080)),
            Some("shop/any".into())
        );
        assert_eq!(
            pod(trace(&ports, other_node_ip, true, Protocol::UDP, 8080)),
            Some("shop/dns".into())
        );
        // Not local, other port, other protocol: untouched.
        assert_eq!(
            trace(&ports, ip("198.19.255.1"), false, Protocol::TCP, 8080),
            None
        );
        assert_eq!(
            trace(&ports, other_node_ip, true, Protocol::TCP, 8081),
            None
        );
        assert_eq!(
            trace(&ports, other_node_ip, true, Protocol::SCTP, 8080),
            None
        );
    }

    #[test]
    fn trace_agrees_with_the_rendered_rule_order() {
        let ports = vec![
            hp("shop/any", "198.18.128.5", None, 80, 80),
            hp("shop/one", "198.18.128.6", Some("198.18.0.11"), 80, 80),
        ];
        let chains = render(&ports);
        let hit = trace(&ports, ip("198.18.0.11"), true, Protocol::TCP, 80).unwrap();
        let first = chains[CHAIN]
            .iter()
            .find(|r| r.contains("--dport 80 "))
            .unwrap();
        assert!(first.ends_with(&chain_name(hit)), "{first}");
    }
}
