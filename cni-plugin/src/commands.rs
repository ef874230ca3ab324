//! The verbs: ADD, DEL, CHECK, STATUS, GC, VERSION, and the dispatcher that
//! turns an invocation (environment + stdin) into stdout JSON and an exit code.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::agent::{self, PodEvent};
use crate::config::{self, CniVersion, NetConf};
use crate::env::{self, CniEnv, Command};
use crate::error::{CniError, Result};
use crate::ipam::{Claim, Ipam, IpamError};
use crate::netlink::{Netlink, NetlinkError, VethEnd};
use crate::netns;
use crate::node_state::{self, Node, NodeStateError};
use crate::result::{mac_string, CniResult, Interface, IpConfig, PrevResult, Route};

/// Run one plugin invocation. Writes the result or the error JSON to
/// `stdout` and returns the process exit code.
pub fn run(
    get_env: &dyn Fn(&str) -> Option<String>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> i32 {
    let mut input = Vec::new();
    let outcome = match stdin.read_to_end(&mut input) {
        Ok(_) => dispatch(get_env, &input),
        Err(e) => Err(CniError::io("read network configuration from stdin", e)),
    };
    let (code, out) = match outcome {
        Ok(Some(v)) => (0, v),
        Ok(None) => return 0,
        Err(e) => {
            let version = config::error_version(&input);
            tracing::error!(code = e.code(), error = %e.details(), "CNI command failed");
            (
                1,
                serde_json::to_value(e.to_json(&version)).unwrap_or_default(),
            )
        }
    };
    let mut text = serde_json::to_vec(&out).unwrap_or_default();
    text.push(b'\n');
    if let Err(e) = stdout.write_all(&text).and_then(|()| stdout.flush()) {
        tracing::error!(error = %e, "writing to stdout");
        return 1;
    }
    code
}

fn dispatch(
    get_env: &dyn Fn(&str) -> Option<String>,
    input: &[u8],
) -> Result<Option<serde_json::Value>> {
    let command = env::command(get_env)?;
    if command == Command::Version {
        return Ok(Some(version_json()));
    }
    let env = env::parse(get_env)?;
    let conf = NetConf::parse(input)?;
    tracing::debug!(command = %command, container = %env.container_id, ifname = %env.ifname,
        network = %conf.name, version = %conf.cni_version, "invoked");
    match command {
        Command::Add => add(&env, &conf).map(Some),
        Command::Del => del(&env, &conf).map(|()| None),
        Command::Check => {
            require_version(&conf, CniVersion::V040, "CHECK")?;
            check(&env, &conf).map(|()| None)
        }
        Command::Status => {
            require_version(&conf, CniVersion::V110, "STATUS")?;
            status(&conf).map(|()| None)
        }
        Command::Gc => {
            require_version(&conf, CniVersion::V110, "GC")?;
            gc(&conf).map(|()| None)
        }
        Command::Version => Ok(Some(version_json())),
    }
}

pub fn version_json() -> serde_json::Value {
    json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": CniVersion::SUPPORTED.map(|v| v.as_str()),
    })
}

fn require_version(conf: &NetConf, min: CniVersion, verb: &str) -> Result<()> {
    if conf.cni_version < min {
        return Err(CniError::IncompatibleVersion {
            version: conf.cni_version.as_str().into(),
            reason: format!("{verb} needs cniVersion {min} or later"),
        });
    }
    Ok(())
}

/// Host-side veth name: `weft` + 8 hex digits of SHA-256(containerID/ifname);
/// 12 bytes, stable, so DEL and GC find it without any state.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = attachment_digest(container_id, ifname);
    format!(
        "weft{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

fn attachment_digest(container_id: &str, ifname: &str) -> [u8; 32] {
    // '/' can appear in neither, so the pair is unambiguous.
    Sha256::digest(format!("{container_id}/{ifname}").as_bytes()).into()
}

/// Host-side MAC: locally administered, and starting with 0xfe so a port
/// never becomes the lowest MAC on a bridge whose address is not pinned.
pub fn host_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let d = attachment_digest(container_id, ifname);
    [0xfe, d[4], d[5], d[6], d[7], d[8]]
}

/// Container-side MAC: `0a:58:` + the IPv4 address (the Kubernetes
/// convention), so the MAC follows the address and ARP caches stay right.
pub fn container_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

fn load_node(conf: &NetConf) -> std::result::Result<Node, NodeStateError> {
    node_state::load(&conf.node_state_path)
}

fn ipam_err(e: IpamError) -> CniError {
    match e {
        IpamError::Exhausted { subnet } => CniError::IpamExhausted {
            subnet: subnet.to_string(),
        },
        IpamError::Io { op, dir, source } => {
            CniError::io(format!("IPAM {op} in {}", dir.display()), source)
        }
    }
}

fn nl_err(e: NetlinkError) -> CniError {
    CniError::kernel(e.op, e.source)
}

fn open_netns(path: &str) -> Result<File> {
    netns::open(Path::new(path)).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            CniError::ContainerUnknown {
                what: format!("network namespace {path}"),
                source: Some(source),
            }
        } else {
            CniError::io(format!("open network namespace {path}"), source)
        }
    })
}

fn netlink_in(ns: &File, path: &str) -> Result<Netlink> {
    netns::run_in(ns, Netlink::open)
        .and_then(|r| r)
        .map_err(|e| CniError::kernel(format!("enter network namespace {path}"), e))
}

fn event(op: &'static str, env: &CniEnv, ip: Option<String>) -> PodEvent {
    PodEvent {
        op,
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        ip,
        pod_namespace: env.pod.namespace.clone(),
        pod_name: env.pod.name.clone(),
        pod_uid: env.pod.uid.clone(),
    }
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<serde_json::Value> {
    // Before anything is allocated or created: bad input changes nothing.
    let port_mappings = conf.port_mappings()?;
    let netns_path = env.netns.as_deref().unwrap_or_default();
    let node = load_node(conf).map_err(|e| CniError::TryAgainLater {
        what: e.to_string(),
        source: match e {
            NodeStateError::Unreadable { source, .. } => Some(source),
            NodeStateError::Invalid { .. } => None,
        },
    })?;
    let ns = open_netns(netns_path)?;
    let mut nl = Netlink::open().map_err(|e| CniError::kernel("open netlink socket", e))?;
    let bridge = nl
        .link_by_name(&node.bridge)
        .map_err(nl_err)?
        .ok_or_else(|| CniError::TryAgainLater {
            what: format!(
                "bridge {} does not exist yet (the agent creates it)",
                node.bridge
            ),
            source: None,
        })?;
    let ipam = Ipam::open(&conf.ipam_dir, conf.ipam_fsync).map_err(ipam_err)?;
    let claim = Claim {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        pod: env.pod.clone(),
        port_mappings,
    };
    // Dropped without commit on any error below: the address goes back.
    let alloc = ipam
        .allocate(node.subnet, node.gateway, &claim)
        .map_err(ipam_err)?;
    let ip = alloc.ip;
    let address = Ipv4Network::new(ip, node.subnet.prefix())
        .map_err(|e| CniError::io("build pod address", io::Error::other(e.to_string())))?;

    let host_name = host_ifname(&env.container_id, &env.ifname);
    let host = VethEnd {
        name: &host_name,
        mac: host_mac(&env.container_id, &env.ifname),
        mtu: node.mtu,
    };
    let peer = VethEnd {
        name: &env.ifname,
        mac: container_mac(ip),
        mtu: node.mtu,
    };
    let mut created = false;
    let outcome = (|| -> Result<()> {
        use std::os::fd::AsRawFd;
        match nl.create_veth(&host, bridge.index, &peer, ns.as_raw_fd()) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                // A leftover of an earlier, interrupted ADD of this attachment
                // (the name is derived from it): replace it.
                tracing::info!(link = %host_name, "replacing leftover host veth");
                nl.delete_link(&host_name).map_err(nl_err)?;
                nl.create_veth(&host, bridge.index, &peer, ns.as_raw_fd())
                    .map_err(nl_err)?;
            }
            other => other.map_err(nl_err)?,
        }
        created = true;
        let host_link = nl
            .link_by_name(&host_name)
            .map_err(nl_err)?
            .ok_or_else(|| {
                CniError::kernel(
                    format!("find new veth {host_name}"),
                    io::Error::from_raw_os_error(libc::ENODEV),
                )
            })?;
        nl.set_hairpin(host_link.index, &host_name)
            .map_err(nl_err)?;
        disable_accept_ra(&host_name)?;

        let mut cnl = netlink_in(&ns, netns_path)?;
        let link = cnl
            .link_by_name(&env.ifname)
            .map_err(nl_err)?
            .ok_or_else(|| {
                CniError::kernel(
                    format!("find {} in {netns_path}", env.ifname),
                    io::Error::from_raw_os_error(libc::ENODEV),
                )
            })?;
        cnl.add_address(link.index, ip, node.subnet.prefix())
            .map_err(nl_err)?;
        cnl.set_up(link.index, &env.ifname).map_err(nl_err)?;
        cnl.add_default_route(node.gateway, link.index)
            .map_err(nl_err)?;
        Ok(())
    })();
    if let Err(e) = outcome {
        if created {
            if let Err(cleanup) = nl.delete_link(&host_name) {
                tracing::warn!(link = %host_name, error = %cleanup, "cleanup after failed ADD");
            }
        }
        return Err(e);
    }
    let ip = alloc.commit();

    let mut dns = if node.dns.is_empty() {
        conf.dns.clone().unwrap_or_default()
    } else {
        node.dns.clone()
    };
    pod_search_path(&mut dns, env.pod.namespace.as_deref());
    let result = CniResult {
        interfaces: vec![
            Interface {
                name: host_name.clone(),
                mac: mac_string(&host.mac),
                mtu: Some(node.mtu),
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: mac_string(&peer.mac),
                mtu: Some(node.mtu),
                sandbox: Some(netns_path.to_string()),
            },
        ],
        ips: vec![IpConfig {
            address,
            gateway: Some(node.gateway),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0 is valid"),
            gw: Some(node.gateway),
        }],
        dns,
    };
    tracing::info!(container = %env.container_id, ifname = %env.ifname, %ip,
        host_if = %host_name, host_ports = claim.port_mappings.len(), "pod attached");
    agent::notify(
        &conf.agent_socket,
        &event("add", env, Some(address.to_string())),
    );
    Ok(result.render(conf.cni_version))
}

/// The host side must not autoconfigure from router advertisements a pod sends.
fn disable_accept_ra(ifname: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra");
    match std::fs::write(&path, b"0") {
        Ok(()) => Ok(()),
        // IPv6 disabled on this node: nothing to accept RAs with.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::kernel(format!("write {path}"), e)),
    }
}

fn del(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let host_name = host_ifname(&env.container_id, &env.ifname);
    // The link first, so a freed address is never still on an interface.
    let mut nl = Netlink::open().map_err(|e| CniError::kernel("open netlink socket", e))?;
    let removed = nl.delete_link(&host_name).map_err(nl_err)?;
    let freed = match Ipam::open_existing(&conf.ipam_dir, conf.ipam_fsync) {
        Some(ipam) => ipam
            .release(&env.container_id, &env.ifname)
            .map_err(ipam_err)?,
        None => Vec::new(),
    };
    tracing::info!(container = %env.container_id, ifname = %env.ifname,
        link_removed = removed, freed = ?freed, "pod detached");
    if removed || !freed.is_empty() {
        let ip = freed.first().map(|ip| ip.to_string());
        agent::notify(&conf.agent_socket, &event("del", env, ip));
    }
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::config("prevResult", "", "is required for CHECK"))?;
    let prev: PrevResult =
        serde_json::from_value(prev.clone()).map_err(|source| CniError::Decode {
            what: "prevResult".into(),
            source,
        })?;
    let mismatch = |what: String| CniError::CheckMismatch { what };
    let mut want_ports = conf.port_mappings()?;
    let want = prev
        .container_ip(&env.ifname)
        .ok_or_else(|| mismatch(format!("prevResult has no IPv4 address for {}", env.ifname)))?;
    let node = load_node(conf).map_err(|e| CniError::TryAgainLater {
        what: e.to_string(),
        source: None,
    })?;
    let netns_path = env.netns.as_deref().unwrap_or_default();
    let ns = open_netns(netns_path)?;

    let ipam = Ipam::open_existing(&conf.ipam_dir, conf.ipam_fsync)
        .ok_or_else(|| mismatch(format!("no IPAM store at {}", conf.ipam_dir.display())))?;
    let claim = match ipam
        .find_entry(&env.container_id, &env.ifname)
        .map_err(ipam_err)?
    {
        Some(e) if e.ip == want.ip() => e.claim.unwrap_or_default(),
        Some(e) => {
            return Err(mismatch(format!(
                "IPAM holds {} for this attachment but prevResult says {want}",
                e.ip
            )))
        }
        None => return Err(mismatch(format!("no IPAM claim for {want}"))),
    };
    // The agent programs hostPorts from the claim: it must hold what the
    // runtime asked for.
    let mut have_ports = claim.port_mappings;
    have_ports.sort();
    want_ports.sort();
    if have_ports != want_ports {
        let list = |v: &[weft_model::node_state::PortMapping]| {
            v.iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(mismatch(format!(
            "the IPAM claim records hostPorts [{}] but runtimeConfig.portMappings has [{}]",
            list(&have_ports),
            list(&want_ports)
        )));
    }

    let host_name = host_ifname(&env.container_id, &env.ifname);
    let mut nl = Netlink::open().map_err(|e| CniError::kernel("open netlink socket", e))?;
    let bridge = nl.link_by_name(&node.bridge).map_err(nl_err)?;
    let host = nl
        .link_by_name(&host_name)
        .map_err(nl_err)?
        .ok_or_else(|| mismatch(format!("host veth {host_name} is missing")))?;
    if bridge.as_ref().map(|b| b.index) != host.master {
        return Err(mismatch(format!(
            "host veth {host_name} is not attached to bridge {}",
            node.bridge
        )));
    }

    let mut cnl = netlink_in(&ns, netns_path)?;
    let link = cnl
        .link_by_name(&env.ifname)
        .map_err(nl_err)?
        .ok_or_else(|| mismatch(format!("{} is missing in {netns_path}", env.ifname)))?;
    if !link.up {
        return Err(mismatch(format!("{} is down", env.ifname)));
    }
    let addrs = cnl.addresses(link.index).map_err(nl_err)?;
    if !addrs.contains(&(want.ip(), want.prefix())) {
        return Err(mismatch(format!(
            "{} does not have address {want}",
            env.ifname
        )));
    }
    let routes = cnl.default_routes().map_err(nl_err)?;
    if !routes.contains(&(Some(node.gateway), Some(link.index))) {
        return Err(mismatch(format!(
            "no default route via {} on {}",
            node.gateway, env.ifname
        )));
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<()> {
    let unavailable = |what: String| CniError::NotAvailable { what };
    let node = load_node(conf).map_err(|e| unavailable(crate::error::chain(&e)))?;
    let mut nl = Netlink::open().map_err(|e| unavailable(format!("open netlink socket: {e}")))?;
    match nl.link_by_name(&node.bridge) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(unavailable(format!(
                "bridge {} does not exist",
                node.bridge
            )))
        }
        Err(e) => return Err(unavailable(crate::error::chain(&e))),
    }
    if let Some(ipam) = Ipam::open_existing(&conf.ipam_dir, conf.ipam_fsync) {
        let used = ipam
            .entries()
            .map_err(|e| unavailable(crate::error::chain(&e)))?
            .into_iter()
            .filter(|e| node.subnet.contains(e.ip))
            .count() as u64;
        // Hosts minus network, broadcast and gateway.
        let capacity = (1u64 << (32 - node.subnet.prefix())) - 3;
        if used >= capacity {
            return Err(unavailable(format!(
                "no free address left in {}",
                node.subnet
            )));
        }
    }
    Ok(())
}

fn gc(conf: &NetConf) -> Result<()> {
    let keep = conf
        .valid_attachments
        .as_deref()
        .ok_or_else(|| CniError::config("cni.dev/valid-attachments", "", "is required for GC"))?;
    let Some(ipam) = Ipam::open_existing(&conf.ipam_dir, conf.ipam_fsync) else {
        return Ok(());
    };
    let freed = ipam.retain(keep).map_err(ipam_err)?;
    let mut nl = Netlink::open().map_err(|e| CniError::kernel("open netlink socket", e))?;
    // Keep going after a failure and report them all at the end.
    let mut failures = Vec::new();
    for entry in &freed {
        let Some(claim) = &entry.claim else { continue };
        let host_name = host_ifname(&claim.container_id, &claim.ifname);
        match nl.delete_link(&host_name) {
            Ok(_) => {}
            Err(e) => failures.push(crate::error::chain(&e)),
        }
        tracing::info!(ip = %entry.ip, container = %claim.container_id, ifname = %claim.ifname,
            "garbage-collected stale attachment");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::kernel(
            "GC link removal",
            io::Error::other(failures.join("; ")),
        ))
    }
}

/// A pod's search list starts with its own namespace (`<ns>.svc.<zone>`,
/// then `svc.<zone>`, `<zone>`), as the kubelet writes it: the node's list
/// starts at `svc.<zone>`, the pod's namespace is known from CNI_ARGS.
fn pod_search_path(dns: &mut crate::node_state::Dns, namespace: Option<&str>) {
    let Some(ns) = namespace.filter(|n| !n.is_empty()) else {
        return;
    };
    let Some(first) = dns.search.first() else {
        return;
    };
    if let Some(zone) = first.strip_prefix("svc.") {
        let own = format!("{ns}.svc.{zone}");
        if !dns.search.contains(&own) {
            dns.search.insert(0, own);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_pod_namespace_leads_the_search_list() {
        let node = crate::node_state::Dns {
            nameservers: vec!["198.19.0.10".into()],
            search: vec!["svc.cluster.local".into(), "cluster.local".into()],
            options: vec!["ndots:5".into()],
            ..Default::default()
        };
        let mut dns = node.clone();
        pod_search_path(&mut dns, Some("shop"));
        assert_eq!(
            dns.search,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        // Idempotent; no namespace or a search list of another shape: unchanged.
        pod_search_path(&mut dns, Some("shop"));
        assert_eq!(dns.search.len(), 3);
        let mut d = node.clone();
        pod_search_path(&mut d, None);
        assert_eq!(d, node);
        let mut d = crate::node_state::Dns {
            search: vec!["example.test".into()],
            ..node.clone()
        };
        pod_search_path(&mut d, Some("shop"));
        assert_eq!(d.search, ["example.test"]);
    }

    fn invoke(env: &[(&str, &str)], stdin: &str) -> (i32, serde_json::Value) {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut out = Vec::new();
        let code = run(&|k| map.get(k).cloned(), &mut stdin.as_bytes(), &mut out);
        let v = if out.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&out).unwrap()
        };
        (code, v)
    }

    #[test]
    fn version_lists_supported_versions() {
        let (code, v) = invoke(&[("CNI_COMMAND", "VERSION"), ("CNI_NETNS", "dummy")], "");
        assert_eq!(code, 0);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn env_errors_are_cni_json_with_code_4() {
        let (code, v) = invoke(
            &[("CNI_COMMAND", "ADD")],
            r#"{"cniVersion":"0.4.0","name":"n"}"#,
        );
        assert_eq!(code, 1);
        assert_eq!(v["code"], 4);
        assert_eq!(v["cniVersion"], "0.4.0");
        let msg = v["msg"].as_str().unwrap();
        for k in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            assert!(msg.contains(k), "{msg}");
        }
    }

    #[test]
    fn config_errors_have_their_codes() {
        let env = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(invoke(&env, "{").1["code"], 6);
        assert_eq!(
            invoke(&env, r#"{"cniVersion":"0.2.0","name":"n"}"#).1["code"],
            1
        );
        assert_eq!(
            invoke(&env, r#"{"cniVersion":"1.1.0","name":"a/b"}"#).1["code"],
            7
        );
    }

    #[test]
    fn check_status_gc_need_their_spec_versions() {
        let (_, v) = invoke(
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            r#"{"cniVersion":"0.3.1","name":"n"}"#,
        );
        assert_eq!(v["code"], 1);
        let (_, v) = invoke(
            &[("CNI_COMMAND", "STATUS")],
            r#"{"cniVersion":"1.0.0","name":"n"}"#,
        );
        assert_eq!(v["code"], 1);
        let (_, v) = invoke(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")],
            r#"{"cniVersion":"1.0.0","name":"n"}"#,
        );
        assert_eq!(v["code"], 1);
    }

    #[test]
    fn status_without_node_state_is_50() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","nodeStatePath":"{}/node.json","ipamDir":"{}"}}"#,
            dir.path().display(),
            dir.path().display()
        );
        let (code, v) = invoke(&[("CNI_COMMAND", "STATUS")], &conf);
        assert_eq!(code, 1);
        assert_eq!(v["code"], 50);
        assert!(v["details"].as_str().unwrap().contains("node.json"));
    }

    #[test]
    fn add_without_node_state_is_try_again_and_allocates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","nodeStatePath":"{0}/node.json","ipamDir":"{0}"}}"#,
            dir.path().display()
        );
        let (code, v) = invoke(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/run/netns/none"),
            ],
            &conf,
        );
        assert_eq!(code, 1);
        assert_eq!(v["code"], 11);
        assert!(!dir.path().join("n").exists());
    }

    #[test]
    fn add_with_a_bad_port_mapping_is_refused_before_anything_happens() {
        let dir = tempfile::tempdir().unwrap();
        // A valid node state, so only the mapping can be what fails.
        std::fs::write(
            dir.path().join("node.json"),
            r#"{"subnet":"198.18.128.0/24","gateway":"198.18.128.1","mtu":1450,"bridge":"weft0"}"#,
        )
        .unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","nodeStatePath":"{0}/node.json","ipamDir":"{0}",
                "runtimeConfig":{{"portMappings":[
                    {{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":""}},
                    {{"hostPort":70000,"containerPort":80,"protocol":"tcp","hostIP":""}}]}}}}"#,
            dir.path().display()
        );
        let (code, v) = invoke(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/run/netns/none"),
            ],
            &conf,
        );
        assert_eq!(code, 1);
        assert_eq!(v["code"], 7, "{v}");
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.contains("runtimeConfig.portMappings[1].hostPort=\"70000\": is not a valid port"),
            "{msg}"
        );
        assert!(!dir.path().join("n").exists(), "IPAM was touched");
    }

    #[test]
    fn gc_requires_the_attachment_list() {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","ipamDir":"{}"}}"#,
            dir.path().display()
        );
        let (_, v) = invoke(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")], &conf);
        assert_eq!(v["code"], 7);
    }

    #[test]
    fn names_and_macs() {
        let n = host_ifname("0123456789abcdef", "eth0");
        assert!(n.starts_with("weft") && n.len() == 12, "{n}");
        assert_eq!(n, host_ifname("0123456789abcdef", "eth0"));
        assert_ne!(n, host_ifname("0123456789abcdef", "net1"));
        assert_eq!(host_mac("a", "eth0")[0], 0xfe);
        assert_eq!(
            container_mac(Ipv4Addr::new(198, 18, 128, 5)),
            [0x0a, 0x58, 198, 18, 128, 5]
        );
    }
}
