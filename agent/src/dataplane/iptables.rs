//! Rendering a [`ServicePlan`] into iptables rules the way kube-proxy
//! structures them, in weft's own chains only (`WEFT-…`), and the minimal
//! `iptables-restore --noflush` input that rewrites just the chains that
//! changed. Pure: applying it (and following the host's nft/legacy mode) is
//! the dataplane's job.
//!
//! nat: `WEFT-SERVICES` (from PREROUTING and OUTPUT) matches cluster IPs,
//! external and load-balancer IPs, then local destinations to
//! `WEFT-NODEPORTS`; `WEFT-SVC-*` (internal endpoints, masquerading sources
//! outside the cluster CIDR; each endpoint rule translates in place, no
//! chain per endpoint), `WEFT-EXT-*` (external traffic policy),
//! `WEFT-SVL-*` (local endpoints), `WEFT-MARK-MASQ`, `WEFT-SNAT` (marked
//! traffic and hairpin; the overlay's pod masquerade owns `WEFT-POSTROUTING`).
//! A Local traffic policy with no local endpoint jumps to `WEFT-MARK-DROP`.
//! filter: `WEFT-SERVICES` rejects frontends with no usable endpoint,
//! `WEFT-FIREWALL` drops what was marked for dropping, `WEFT-FORWARD`
//! accepts pod and service traffic on hosts whose FORWARD policy is DROP.

use super::plan::{FrontendKind, PlannedService, ServicePlan, Target};
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use weft_model::view::Protocol;

/// The mark that asks WEFT-SNAT to masquerade a connection's source.
pub const MASQ_BIT: &str = "0x4000";
pub const MASQ_MARK: &str = "0x4000/0x4000";
/// The mark that asks WEFT-FIREWALL to drop a packet (a Local traffic
/// policy with no local endpoint: nat cannot drop).
pub const DROP_BIT: &str = "0x8000";
pub const DROP_MARK: &str = "0x8000/0x8000";

/// Rules per chain, per table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub nat: BTreeMap<String, Vec<String>>,
    pub filter: BTreeMap<String, Vec<String>>,
}

/// A short, stable hash for chain names (FNV-1a, hex, 16 chars): chain names
/// stay within iptables' 28 characters.
pub(super) fn hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016X}")
}

pub(super) fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::TCP => "tcp",
        Protocol::UDP => "udp",
        Protocol::SCTP => "sctp",
    }
}

fn port_id(svc: &PlannedService, i: usize) -> String {
    let p = &svc.ports[i];
    format!(
        "{}/{}:{}/{}",
        svc.namespace,
        svc.name,
        p.name,
        proto(p.protocol)
    )
}

fn comment(svc: &PlannedService, i: usize) -> String {
    let p = &svc.ports[i];
    if p.name.is_empty() {
        format!("\"{}/{}\"", svc.namespace, svc.name)
    } else {
        format!("\"{}/{}:{}\"", svc.namespace, svc.name, p.name)
    }
}

/// One Service's share of the ruleset: its own nat chains and its rules in
/// the shared chains. Rendered once per Service change and kept by the
/// dataplane, so a change costs one Service, not the whole plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Its own nat chains (`WEFT-SVC-*`, `WEFT-SVL-*`, `WEFT-EXT-*`).
    pub chains: Vec<(String, Vec<String>)>,
    /// Its rules for cluster, external and load-balancer IPs, with the
    /// address each matches (they go into the `WEFT-SVCS-*` bucket of the
    /// address's /24).
    pub services: Vec<(std::net::IpAddr, String)>,
    /// Its rules in nat `WEFT-NODEPORTS`.
    pub nodeports: Vec<String>,
    /// Its rules in filter `WEFT-SERVICES` (no usable endpoint: REJECT).
    pub reject: Vec<String>,
    /// Its local endpoint addresses (hairpin rules in `WEFT-SNAT`).
    pub local: Vec<std::net::IpAddr>,
}

/// Render the whole plan.
pub fn render(plan: &ServicePlan, cluster_cidr: &str) -> Ruleset {
    let parts: Vec<ServiceRules> = plan
        .services
        .iter()
        .map(|s| render_service(s, cluster_cidr))
        .collect();
    let mut rs = Ruleset::default();
    for part in &parts {
        rs.nat.extend(part.chains.iter().cloned());
    }
    shared_chains(parts.iter(), cluster_cidr, &mut rs);
    rs
}

/// The chains every Service shares, from the Services' parts (in plan order),
/// inserted into `rs` (replacing what was there).
pub fn shared_chains<'a>(
    parts: impl Iterator<Item = &'a ServiceRules>,
    cluster_cidr: &str,
    rs: &mut Ruleset,
) {
    let mut buckets: BTreeMap<(IpNetwork, String), Vec<String>> = BTreeMap::new();
    let mut nodeports = Vec::new();
    let mut reject = Vec::new();
    let mut local = BTreeSet::new();
    for part in parts {
        for (ip, rule) in &part.services {
            buckets.entry(bucket(*ip)).or_default().push(rule.clone());
        }
        nodeports.extend(part.nodeports.iter().cloned());
        reject.extend(part.reject.iter().cloned());
        local.extend(part.local.iter().copied());
    }
    // Two levels: a packet walks the /24 jumps, then one bucket — not every
    // Service's rule (a linear chain of 10,000 rules costs every new
    // connection), and a Service added or removed rewrites one bucket.
    let mut services = Vec::with_capacity(buckets.len() + 1);
    for ((net, chain), rules) in buckets {
        services.push(format!("-d {net} -j {chain}"));
        rs.nat.insert(chain, rules);
    }
    services.push("-m addrtype --dst-type LOCAL -j WEFT-NODEPORTS".into());
    rs.nat.insert("WEFT-SERVICES".into(), services);
    rs.nat.insert("WEFT-NODEPORTS".into(), nodeports);
    rs.nat.insert(
        "WEFT-MARK-MASQ".into(),
        vec![format!("-j MARK --or-mark {MASQ_BIT}")],
    );
    rs.nat.insert(
        "WEFT-MARK-DROP".into(),
        vec![format!("-j MARK --or-mark {DROP_BIT}")],
    );
    let mut snat = hairpin(&local);
    snat.extend([
        format!("-m mark ! --mark {MASQ_MARK} -j RETURN"),
        format!("-j MARK --xor-mark {MASQ_BIT}"),
        "-m comment --comment \"weft service traffic requiring SNAT\" -j MASQUERADE --random-fully"
            .into(),
    ]);
    rs.nat.insert("WEFT-SNAT".into(), snat);
    rs.filter.insert("WEFT-SERVICES".into(), reject);
    rs.filter.insert(
        "WEFT-FIREWALL".into(),
        vec![
            format!("-m mark --mark {DROP_MARK} -m comment --comment \"a Local traffic policy without a local endpoint\" -j DROP"),
            // route_localnet is set on weft's bridge (localhost hostPorts and
            // NodePorts need it): never let a neighbour reach 127.0.0.0/8 (CVE-2020-8558).
            "! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -m comment --comment \"block incoming localnet connections\" -j DROP".into(),
        ],
    );
    rs.filter.insert(
        "WEFT-FORWARD".into(),
        vec![
            "-m conntrack --ctstate INVALID -j DROP".into(),
            format!("-m mark --mark {MASQ_MARK} -m comment --comment \"service traffic to be masqueraded\" -j ACCEPT"),
            format!("-s {cluster_cidr} -m comment --comment \"pod traffic\" -j ACCEPT"),
            format!("-d {cluster_cidr} -m comment --comment \"pod traffic\" -j ACCEPT"),
        ],
    );
}

/// Prefix of the chains that hold the frontends of one /24 (IPv4) or /120 (IPv6).
pub const BUCKET_PREFIX: &str = "WEFT-SVCS-";

/// The bucket of a frontend address: its network and chain.
fn bucket(ip: std::net::IpAddr) -> (IpNetwork, String) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let net = u32::from(v4) & 0xffff_ff00;
            let network = IpNetwork::new(std::net::Ipv4Addr::from(net).into(), 24)
                .expect("24 is a valid IPv4 prefix");
            (network, format!("{BUCKET_PREFIX}{net:08X}"))
        }
        std::net::IpAddr::V6(v6) => {
            let net = u128::from(v6) & !0xff;
            let network = IpNetwork::new(std::net::Ipv6Addr::from(net).into(), 120)
                .expect("120 is a valid IPv6 prefix");
            (
                network,
                format!("{BUCKET_PREFIX}{}", &hash(&network.to_string())),
            )
        }
    }
}

/// One Service's rules.
pub fn render_service(svc: &PlannedService, cluster_cidr: &str) -> ServiceRules {
    let mut out = ServiceRules::default();
    let mut local_ips = BTreeSet::new();
    for pb in &svc.backends {
        for t in pb.cluster.iter().chain(&pb.internal).chain(&pb.external) {
            if t.local {
                local_ips.insert(t.ip);
            }
        }
    }
    out.local = local_ips.into_iter().collect();
    for (i, pb) in svc.backends.iter().enumerate() {
        let id = port_id(svc, i);
        let c = comment(svc, i);
        let p = proto(svc.ports[i].protocol);
        let frontends: Vec<_> = svc.frontends.iter().filter(|f| f.port_index == i).collect();
        if pb.cluster.is_empty() {
            // No usable endpoint anywhere: refuse at once, never time out.
            for f in &frontends {
                out.reject.push(format!(
                    "-d {}/32 -p {p} -m {p} --dport {} -m comment --comment {c} -j REJECT",
                    f.ip, f.port
                ));
            }
            continue;
        }
        let affinity = svc.affinity_timeout;
        // WEFT-SVC: every usable endpoint; WEFT-SVL: the local ones, when a
        // Local traffic policy needs them.
        let svc_chain = format!("WEFT-SVC-{}", hash(&id));
        let svl_chain = format!("WEFT-SVL-{}", hash(&id));
        let ext_chain = format!("WEFT-EXT-{}", hash(&id));
        // The usable local endpoints (their own terminating fallback), for
        // the Local traffic policies.
        let local: &[Target] = if svc.internal_local {
            &pb.internal
        } else if svc.external_local {
            &pb.external
        } else {
            &[]
        };
        // Traffic to the cluster IPs: pods keep their source, anything else
        // is masqueraded (in the endpoint chain, as kube-proxy does, so
        // WEFT-SERVICES keeps one rule per frontend);
        // internalTrafficPolicy picks the endpoint chain.
        let masq: Vec<String> = frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::ClusterIP)
            .map(|f| {
                format!(
                    "! -s {cluster_cidr} -d {}/32 -p {p} -m {p} --dport {} -m comment --comment {c} -j WEFT-MARK-MASQ",
                    f.ip, f.port
                )
            })
            .collect();
        let mut cluster_rules = if svc.internal_local {
            Vec::new()
        } else {
            masq.clone()
        };
        cluster_rules.extend(spread(&pb.cluster, &id, p, affinity));
        out.chains.push((svc_chain.clone(), cluster_rules));
        if (svc.internal_local || svc.external_local) && !local.is_empty() {
            let mut rules = if svc.internal_local { masq } else { Vec::new() };
            rules.extend(spread(local, &id, p, affinity));
            out.chains.push((svl_chain.clone(), rules));
        }
        let local_or_drop = if local.is_empty() {
            "WEFT-MARK-DROP".to_string()
        } else {
            svl_chain.clone()
        };
        let internal = if svc.internal_local {
            local_or_drop.clone()
        } else {
            svc_chain.clone()
        };
        for f in frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::ClusterIP)
        {
            out.services.push((
                f.ip,
                format!(
                    "-d {}/32 -p {p} -m {p} --dport {} -m comment --comment {c} -j {internal}",
                    f.ip, f.port
                ),
            ));
        }
        if !frontends.iter().any(|f| f.kind.external()) {
            continue;
        }
        // Traffic to NodePorts, external and load-balancer IPs.
        let ext = if svc.external_local {
            // Clients outside keep their address and reach local endpoints
            // only; pods are short-circuited to the internal endpoints, and
            // the node itself is masqueraded to them.
            vec![
                format!("-s {cluster_cidr} -m comment --comment \"pods go to the internal endpoints\" -j {internal}"),
                "-m addrtype --src-type LOCAL -j WEFT-MARK-MASQ".to_string(),
                format!("-m addrtype --src-type LOCAL -j {internal}"),
                format!("-m comment --comment {c} -j {local_or_drop}"),
            ]
        } else {
            vec![
                format!("-m comment --comment {c} -j WEFT-MARK-MASQ"),
                format!("-j {svc_chain}"),
            ]
        };
        out.chains.push((ext_chain.clone(), ext));
        for f in frontends.iter().filter(|f| f.kind.external()) {
            let rule = format!(
                "-d {}/32 -p {p} -m {p} --dport {} -m comment --comment {c} -j {ext_chain}",
                f.ip, f.port
            );
            if f.kind == FrontendKind::NodePort {
                out.nodeports.push(rule);
            } else {
                out.services.push((f.ip, rule));
            }
        }
    }
    out
}

/// The rules that spread connections evenly over `targets` (statistic mode
/// random), each translating in place: no chain per endpoint, which keeps
/// the chain count — what iptables-nft pays for most — at one per Service
/// port. With affinity, a client seen within the timeout goes back to its
/// endpoint (an `xt_recent` list per endpoint, named like kube-proxy's
/// endpoint chains).
fn spread(targets: &[Target], id: &str, p: &str, affinity: Option<u32>) -> Vec<String> {
    let mut rules = Vec::new();
    let n = targets.len();
    let lists: Vec<String> = targets
        .iter()
        .map(|t| format!("WEFT-SEP-{}", hash(&format!("{id}@{}:{}", t.ip, t.port))))
        .collect();
    let dnat = |t: &Target| format!("-m {p} -j DNAT --to-destination {}:{}", t.ip, t.port);
    if let Some(timeout) = affinity {
        for (t, list) in targets.iter().zip(&lists) {
            // Checked, then refreshed (kube-proxy's endpoint chain sets it on
            // every pass): the timeout runs from the client's last connection.
            rules.push(format!(
                "-p {p} -m recent --name {list} --rcheck --seconds {timeout} --reap -m recent --name {list} --set {}",
                dnat(t)
            ));
        }
    }
    for (i, (t, list)) in targets.iter().zip(&lists).enumerate() {
        let left = n - i;
        let pick = if left > 1 {
            format!(
                "-m statistic --mode random --probability {:.10} ",
                1.0 / left as f64
            )
        } else {
            String::new()
        };
        let remember = if affinity.is_some() {
            format!("-m recent --name {list} --set ")
        } else {
            String::new()
        };
        rules.push(format!("-p {p} {pick}{remember}{}", dnat(t)));
    }
    rules
}

/// Hairpin: a pod translated to itself leaves with the node's address, or
/// its answer would skip the translation. After DNAT, source and destination
/// are the same pod only then; one rule per local endpoint address.
fn hairpin(local: &BTreeSet<std::net::IpAddr>) -> Vec<String> {
    local
        .iter()
        .map(|ip| {
            format!("-s {ip}/32 -d {ip}/32 -m conntrack --ctstate DNAT -m comment --comment \"hairpin\" -j MASQUERADE --random-fully")
        })
        .collect()
}

/// `iptables-restore --noflush` input that makes `want` current given that
/// `have` is what was last applied: only changed chains are rewritten, chains
/// no longer wanted are flushed and deleted. `None` when nothing changed.
pub fn restore_input(have: &Ruleset, want: &Ruleset) -> Option<String> {
    let gone = |h: &BTreeMap<String, Vec<String>>, w: &BTreeMap<String, Vec<String>>| {
        h.keys()
            .filter(|k| !w.contains_key(*k))
            .cloned()
            .collect::<BTreeSet<String>>()
    };
    restore_input_partial(
        have,
        want,
        &gone(&have.nat, &want.nat),
        &gone(&have.filter, &want.filter),
    )
}

/// [`restore_input`] when `want` holds only the chains that may have changed
/// and `gone_*` the chains that may no longer exist: every other chain is
/// left alone without being compared (a change costs what it touches).
pub fn restore_input_partial(
    have: &Ruleset,
    want: &Ruleset,
    gone_nat: &BTreeSet<String>,
    gone_filter: &BTreeSet<String>,
) -> Option<String> {
    let mut out = String::new();
    for (table, h, w, maybe_gone) in [
        ("nat", &have.nat, &want.nat, gone_nat),
        ("filter", &have.filter, &want.filter, gone_filter),
    ] {
        let changed: Vec<&String> = w
            .iter()
            .filter(|(k, v)| h.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        let gone: Vec<&String> = maybe_gone
            .iter()
            .filter(|k| h.contains_key(*k) && !w.contains_key(*k))
            .collect();
        if changed.is_empty() && gone.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for c in changed.iter().chain(gone.iter()) {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for c in &changed {
            for r in &w[*c] {
                let _ = writeln!(out, "-A {c} {r}");
            }
        }
        for c in &gone {
            let _ = writeln!(out, "-X {c}");
        }
        let _ = writeln!(out, "COMMIT");
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, node_port_service, CLUSTER_CIDR};
    use super::*;
    use weft_model::{Backend, ServiceEntry};

    fn be(ip: &str, node: &str, ready: bool) -> Backend {
        fixtures::backend(ip, node, ready, ready, false)
    }

    fn svc(
        name: &str,
        backends: Vec<Backend>,
        etp_local: bool,
        affinity: Option<u32>,
    ) -> ServiceEntry {
        ServiceEntry {
            external_local: etp_local,
            affinity_timeout: affinity,
            ..node_port_service(name, backends)
        }
    }

    fn render_of(services: Vec<ServiceEntry>) -> Ruleset {
        render(&fixtures::plan(services), CLUSTER_CIDR)
    }

    #[test]
    fn chains_are_ours_and_short() {
        let rs = render_of(vec![svc(
            "web",
            vec![
                be("198.18.128.5", "node-1", true),
                be("198.18.129.5", "node-2", true),
            ],
            false,
            None,
        )]);
        for name in rs.nat.keys().chain(rs.filter.keys()) {
            assert!(name.starts_with("WEFT-") && name.len() <= 28, "{name}");
        }
        // two levels: the /24 jumps, then the frontends of that /24
        let services = &rs.nat["WEFT-SERVICES"];
        assert_eq!(services[0], "-d 198.19.0.0/24 -j WEFT-SVCS-C6130000");
        let bucket = &rs.nat["WEFT-SVCS-C6130000"];
        assert!(
            bucket[0].starts_with("-d 198.19.0.20/32 -p tcp -m tcp --dport 80"),
            "{bucket:?}"
        );
        assert_eq!(
            services.last().unwrap(),
            "-m addrtype --dst-type LOCAL -j WEFT-NODEPORTS"
        );
        assert!(rs.nat["WEFT-NODEPORTS"][0]
            .starts_with("-d 198.18.0.11/32 -p tcp -m tcp --dport 30080"));
        // two endpoints: the first taken with probability 1/2, the second always
        let svc_chain = rs.nat.keys().find(|k| k.starts_with("WEFT-SVC-")).unwrap();
        let rules = &rs.nat[svc_chain];
        assert!(rules[0].starts_with("! -s 198.18.128.0/17"));
        assert!(rules[1].contains("--probability 0.5000000000"));
        assert!(
            rules[2].starts_with("-p tcp -m tcp -j DNAT --to-destination 198.18."),
            "the endpoints translate in place, no chain per endpoint: {rules:?}"
        );
        assert!(!rs.nat.keys().any(|k| k.starts_with("WEFT-SEP-")));
        // Hairpin: the local endpoint talking to itself after DNAT is masqueraded.
        let snat = &rs.nat["WEFT-SNAT"];
        assert!(
            snat[0]
                .starts_with("-s 198.18.128.5/32 -d 198.18.128.5/32 -m conntrack --ctstate DNAT")
                && snat[0].contains("MASQUERADE"),
            "{snat:?}"
        );
        assert_eq!(
            snat.len(),
            4,
            "only local endpoints get a hairpin rule: {snat:?}"
        );
        assert!(rs.filter["WEFT-SERVICES"].is_empty());
    }

    #[test]
    fn no_endpoints_reject_and_local_policy_drop() {
        let rs = render_of(vec![svc("empty", vec![], false, None)]);
        assert_eq!(rs.filter["WEFT-SERVICES"].len(), 2, "{:?}", rs.filter);
        assert!(rs.filter["WEFT-SERVICES"]
            .iter()
            .all(|r| r.ends_with("-j REJECT")));
        let rs = render_of(vec![svc(
            "remote-only",
            vec![be("198.18.129.5", "node-2", true)],
            true,
            None,
        )]);
        assert_eq!(rs.filter["WEFT-FIREWALL"].len(), 2);
        let ext = rs
            .nat
            .iter()
            .find(|(k, _)| k.starts_with("WEFT-EXT-"))
            .unwrap()
            .1;
        assert!(
            ext[0].starts_with("-s 198.18.128.0/17"),
            "pods short-circuit to the internal chain: {ext:?}"
        );
        assert!(!ext.iter().any(|r| r.contains("WEFT-SVL-")));
        assert!(
            ext.last().unwrap().ends_with("-j WEFT-MARK-DROP"),
            "outside clients are dropped: {ext:?}"
        );
    }

    #[test]
    fn affinity_uses_recent() {
        let rs = render_of(vec![svc(
            "sticky",
            vec![be("198.18.128.5", "node-1", true)],
            false,
            Some(60),
        )]);
        let svc_chain = rs.nat.keys().find(|k| k.starts_with("WEFT-SVC-")).unwrap();
        let rules = &rs.nat[svc_chain];
        // a returning client: checked and refreshed, straight to its endpoint
        assert!(
            rules[1].contains("-m recent --name WEFT-SEP-")
                && rules[1].contains("--rcheck --seconds 60 --reap")
                && rules[1].contains("--set")
                && rules[1].ends_with("-j DNAT --to-destination 198.18.128.5:8080"),
            "{rules:?}"
        );
        // a new client: remembered as it is sent
        assert!(
            rules[2].contains("--set") && !rules[2].contains("--rcheck"),
            "{rules:?}"
        );
    }

    #[test]
    fn restore_rewrites_only_changed_chains() {
        let a = render_of(vec![
            svc("one", vec![be("198.18.128.5", "node-1", true)], false, None),
            svc("two", vec![be("198.18.129.6", "node-2", true)], false, None),
        ]);
        assert!(
            restore_input(&a, &a).is_none(),
            "nothing changed, nothing to apply"
        );
        let first = restore_input(&Ruleset::default(), &a).unwrap();
        assert!(first.starts_with("*nat\n") && first.contains("COMMIT"));
        // a (remote) endpoint of "two" changes: only its SVC chain changes
        let b = render_of(vec![
            svc("one", vec![be("198.18.128.5", "node-1", true)], false, None),
            svc("two", vec![be("198.18.129.7", "node-2", true)], false, None),
        ]);
        let delta = restore_input(&a, &b).unwrap();
        let flushed: Vec<&str> = delta.lines().filter(|l| l.starts_with(':')).collect();
        assert_eq!(flushed.len(), 1, "{delta}");
        assert_eq!(
            delta.lines().filter(|l| l.starts_with("-X ")).count(),
            0,
            "{delta}"
        );
        assert!(!delta.contains("*filter"), "{delta}");
        assert!(
            !delta.contains("198.18.128.5"),
            "the unchanged service is not touched: {delta}"
        );
    }
}
