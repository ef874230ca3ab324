//! What `netctl ebpf` shows: the eBPF maps in human form. [`read`] takes a
//! [`Snapshot`] of the maps through their pins (the ones the dataplane
//! uses, so it works beside the running programs and needs no handle on
//! the loaded object); [`report`] (pure) names each frontend's Service from
//! the plan, pairs the two entries of each north-south connection and ages
//! the affinity entries.

use super::super::plan::{PlannedService, ServicePlan};
use super::encode::{self, addr_of, FrontendSpec};
use super::kernel::{self, Interface, SOCKET_PROGRAMS};
use super::reconcile::Image;
use super::EbpfConfig;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
use aya::Pod;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use weft_ebpf_abi::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, CtKey, CtValue, MaglevTable, NodeConfig,
    ServiceKey, ServiceValue, SockRevKey, SockRevValue, ABI_VERSION, AFFINITY_CLIENT_IP,
    AFFINITY_MAP, AFFINITY_MATCH_MAP, AFFINITY_MATCH_MAX_ENTRIES, AFFINITY_MAX_ENTRIES,
    BACKENDS_MAP, BACKENDS_MAX_ENTRIES, BACKEND_F_LOCAL, CT_FORWARD, CT_F_SNAT, CT_MAP,
    CT_MAX_ENTRIES, CT_REPLY, MAGLEV_MAP, MAGLEV_MAX_ENTRIES, MAGLEV_TABLE_SIZE, NODE_MAP,
    SCOPE_EXTERNAL, SCOPE_SOCKET, SERVICES_MAP, SERVICES_MAX_ENTRIES, SOCK_REV_MAP,
    SOCK_REV_MAX_ENTRIES, SVC_F_DROP, SVC_F_MAGLEV, SVC_F_REJECT, SVC_F_SNAT,
};

/// At most this many affinity entries and connections are listed (the maps
/// hold up to 65,536 and 131,072); the counts cover them all.
pub const LISTED_MAX: usize = 1000;

/// The maps' contents at one moment, and what is needed to name what they hold.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// WEFT_SVC, WEFT_BE, WEFT_MAGLEV and WEFT_AFF_MATCH.
    pub image: Image,
    /// WEFT_AFF.
    pub affinity: Vec<(AffinityKey, AffinityValue)>,
    /// WEFT_CT: both directions of each connection, as separate entries.
    pub connections: Vec<(CtKey, CtValue)>,
    /// Entries in WEFT_SOCK_REV (their sockets are not listed).
    pub sock_rev: usize,
    /// WEFT_NODE, once the agent has written it.
    pub node: Option<NodeConfig>,
    /// The pin directory of the maps.
    pub pins: PathBuf,
    /// The cgroup the socket programs are attached to.
    pub cgroup: PathBuf,
    /// Names of the pinned links (`weft_connect4`, `tc-weft_1`, ...).
    pub links: Vec<String>,
    /// This node's interfaces (names for the ifindexes in the maps).
    pub interfaces: Vec<Interface>,
    /// Network-namespace cookies (the socket programs' affinity clients)
    /// the agent can name: the node's own and its pods'.
    pub netns: BTreeMap<u64, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("map {map} pinned at {path}: {source}")]
    Open {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("reading map {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

fn read_err(map: &'static str) -> impl Fn(MapError) -> ReadError {
    move |source| ReadError::Read {
        map,
        source: Box::new(source),
    }
}

fn open(pins: &Path, map: &'static str) -> Result<Map, ReadError> {
    let path = pins.join(map);
    let err = |source| ReadError::Open {
        map,
        path: path.clone(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

/// Every entry of a hash map. A key deleted while the kernel walks the map
/// restarts the walk, so entries are deduplicated and the walk is bounded
/// by the map's capacity.
fn entries<K: Pod + Eq + Hash, V: Pod>(
    pins: &Path,
    map: &'static str,
    capacity: u32,
) -> Result<HashMap<K, V>, ReadError> {
    let m: BpfHashMap<MapData, K, V> =
        BpfHashMap::try_from(open(pins, map)?).map_err(read_err(map))?;
    let mut out = HashMap::new();
    for kv in m.iter().take(capacity as usize) {
        let (k, v) = kv.map_err(read_err(map))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// Read the maps pinned under `cfg.bpffs` (the running agent's or an
/// earlier one's), without changing them. Slow with many Services or
/// connections: call it on a blocking thread.
pub fn read(cfg: &EbpfConfig) -> Result<Snapshot, ReadError> {
    let pins = cfg.bpffs.join(format!("maps-v{ABI_VERSION}"));
    let image = Image {
        services: entries(&pins, SERVICES_MAP, SERVICES_MAX_ENTRIES)?
            .into_iter()
            .collect(),
        backends: entries(&pins, BACKENDS_MAP, BACKENDS_MAX_ENTRIES)?
            .into_iter()
            .collect(),
        maglev: entries::<u32, MaglevTable>(&pins, MAGLEV_MAP, MAGLEV_MAX_ENTRIES)?
            .into_iter()
            .map(|(id, t)| (id, t.indices.to_vec()))
            .collect(),
        affinity_match: entries::<AffinityMatchKey, u32>(
            &pins,
            AFFINITY_MATCH_MAP,
            AFFINITY_MATCH_MAX_ENTRIES,
        )?
        .into_keys()
        .collect(),
    };
    let affinity =
        entries::<AffinityKey, AffinityValue>(&pins, AFFINITY_MAP, AFFINITY_MAX_ENTRIES)?
            .into_iter()
            .collect();
    let connections = entries::<CtKey, CtValue>(&pins, CT_MAP, CT_MAX_ENTRIES)?
        .into_iter()
        .collect();
    let sock_rev =
        entries::<SockRevKey, SockRevValue>(&pins, SOCK_REV_MAP, SOCK_REV_MAX_ENTRIES)?.len();
    let node: Array<MapData, NodeConfig> =
        Array::try_from(open(&pins, NODE_MAP)?).map_err(read_err(NODE_MAP))?;
    let node = node.get(&0, 0).map_err(read_err(NODE_MAP))?;
    let mut links: Vec<String> = std::fs::read_dir(cfg.bpffs.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    links.sort();
    let interfaces = kernel::interfaces().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "listing interfaces for the eBPF report");
        Vec::new()
    });
    Ok(Snapshot {
        image,
        affinity,
        connections,
        sock_rev,
        // The array always has its entry: all zero until the agent writes it.
        node: (node != NodeConfig::default()).then_some(node),
        pins,
        cgroup: cfg.cgroup.clone(),
        links,
        interfaces,
        netns: netns_cookies(cfg.ipam_dir.as_deref()),
    })
}

/// The answer to netctl's `ebpf` query: the report of the maps under
/// `cfg`, with Services named from `plan`, or `{"error": ...}`. Blocks
/// (see [`read`]).
pub fn answer(cfg: &EbpfConfig, plan: &ServicePlan) -> Value {
    match read(cfg) {
        Ok(snap) => report(&snap, plan, monotonic_ns()),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`,
/// which stamps the affinity entries.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The cookie of the network namespace the calling thread is in.
fn netns_cookie() -> std::io::Result<u64> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of the network namespace at `path`, read on a thread that
/// enters it (and ends there).
fn netns_cookie_of(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("weft-netns-cookie".into())
            .spawn_scoped(scope, || {
                // SAFETY: a valid namespace fd; setns changes only this
                // thread, which ends when the closure returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                netns_cookie()
            })?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The node's network-namespace cookie and its pods' (from the CNI
/// plugin's claims): who an affinity entry of the socket programs is for.
fn netns_cookies(ipam_dir: Option<&Path>) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    if let Ok(c) = netns_cookie() {
        out.insert(c, "this node".to_string());
    }
    let claims = ipam_dir
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| weft_model::node_state::Claim::decode(&t));
    for claim in claims {
        let Some(netns) = claim.netns else { continue };
        let pod = match (claim.pod.namespace, claim.pod.name) {
            (Some(ns), Some(name)) => format!("pod {ns}/{name}"),
            _ => format!("container {}", claim.container_id),
        };
        match netns_cookie_of(Path::new(&netns)) {
            Ok(c) => {
                out.insert(c, pod);
            }
            // A pod being torn down: its namespace may be gone already.
            Err(e) => tracing::debug!(netns, %e, "no cookie for a pod's network namespace"),
        }
    }
    out
}

fn proto_name(proto: u8) -> String {
    match proto {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => format!("proto {n}"),
    }
}

fn endpoint(addr_be: u32, port_be: u16) -> String {
    format!("{}:{}", addr_of(addr_be), u16::from_be(port_be))
}

fn frontend_name(k: &ServiceKey) -> String {
    format!("{}/{}", endpoint(k.addr_be, k.port_be), proto_name(k.proto))
}

fn scope_name(scope: u8) -> String {
    match scope {
        SCOPE_SOCKET => "socket".into(),
        SCOPE_EXTERNAL => "external".into(),
        n => format!("scope {n}"),
    }
}

fn flag_words(flags: u32) -> Vec<&'static str> {
    [
        (SVC_F_REJECT, "reject"),
        (SVC_F_DROP, "drop"),
        (SVC_F_SNAT, "snat"),
        (SVC_F_MAGLEV, "maglev"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, w)| w)
    .collect()
}

fn backend_name(b: &Backend) -> String {
    let local = if b.flags & BACKEND_F_LOCAL != 0 {
        " (local)"
    } else {
        ""
    };
    format!("{}{local}", endpoint(b.addr_be, b.port_be))
}

/// Frontends are listed by Service, then address, port, protocol, scope.
type FrontendOrder = (String, Ipv4Addr, u16, u8, u8);

/// Who wants a frontend key: the first Service by namespace/name (as the
/// reconciler decides), how it reaches it, and the entry it plans.
struct Owner {
    service: String,
    kind: String,
    spec: FrontendSpec,
}

fn owners(plan: &ServicePlan) -> HashMap<ServiceKey, Owner> {
    let mut services: Vec<&PlannedService> = plan.services.iter().map(|s| &**s).collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut out = HashMap::new();
    for svc in services {
        let kind_of = |key: &ServiceKey| {
            svc.frontends
                .iter()
                .find(|f| {
                    f.ip == IpAddr::V4(addr_of(key.addr_be))
                        && f.port == u16::from_be(key.port_be)
                        && encode::proto_number(f.protocol) == key.proto
                })
                .map(|f| format!("{:?}", f.kind))
                .unwrap_or_default()
        };
        for spec in encode::encode(svc).frontends {
            out.entry(spec.key).or_insert_with(|| Owner {
                service: format!("{}/{}", svc.namespace, svc.name),
                kind: kind_of(&spec.key),
                spec,
            });
        }
    }
    out
}

/// Whether the entry is what the reconciler writes for `spec`.
fn matches_plan(spec: &FrontendSpec, v: &ServiceValue, set: &[Backend]) -> bool {
    let timeout = (v.affinity_id != 0).then_some(v.affinity_timeout_s);
    let mut have = set.to_vec();
    have.sort();
    spec.flags == v.flags
        && spec.affinity.as_ref().map(|(_, t)| *t) == timeout
        && spec.set.as_ref().map_or(&[][..], |s| &s.backends[..]) == &have[..]
}

fn interface_name(interfaces: &[Interface], ifindex: u32) -> String {
    if ifindex == 0 {
        return "none".into();
    }
    interfaces
        .iter()
        .find(|i| i.ifindex == ifindex)
        .map_or_else(|| format!("ifindex {ifindex} (gone)"), |i| i.name.clone())
}

/// One north-south connection from its entries (either may have been
/// evicted from the LRU map on its own).
struct Connection {
    proto: u8,
    client: (u32, u16),
    frontend: (u32, u16),
    backend: (u32, u16),
    masquerade: Option<(u32, u16)>,
    /// Interface the client's packets leave by, translated.
    via: Option<u32>,
    entries: &'static str,
}

fn connections(entries: &[(CtKey, CtValue)]) -> Vec<Connection> {
    let by_key: HashMap<CtKey, CtValue> = entries.iter().copied().collect();
    let reply_key = |k: &CtKey, v: &CtValue| CtKey {
        saddr_be: v.addr_a_be,
        daddr_be: v.addr_b_be,
        sport_be: v.port_a_be,
        dport_be: v.port_b_be,
        proto: k.proto,
        dir: CT_REPLY,
        _pad: 0,
    };
    let mut paired_replies = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (k, v) in entries.iter().filter(|(k, _)| k.dir == CT_FORWARD) {
        let rk = reply_key(k, v);
        let paired = by_key.contains_key(&rk);
        if paired {
            paired_replies.insert(rk);
        }
        out.push(Connection {
            proto: k.proto,
            client: (k.saddr_be, k.sport_be),
            frontend: (k.daddr_be, k.dport_be),
            backend: (v.addr_a_be, v.port_a_be),
            masquerade: (v.flags & CT_F_SNAT != 0).then_some((v.addr_b_be, v.port_b_be)),
            via: Some(v.ifindex),
            entries: if paired { "both" } else { "forward only" },
        });
    }
    for (k, v) in entries
        .iter()
        .filter(|(k, _)| k.dir == CT_REPLY && !paired_replies.contains(k))
    {
        let snat = v.flags & CT_F_SNAT != 0;
        out.push(Connection {
            proto: k.proto,
            client: if snat {
                (v.addr_b_be, v.port_b_be)
            } else {
                (k.daddr_be, k.dport_be)
            },
            frontend: (v.addr_a_be, v.port_a_be),
            backend: (k.saddr_be, k.sport_be),
            masquerade: snat.then_some((k.daddr_be, k.dport_be)),
            via: None,
            entries: "reply only",
        });
    }
    out
}

/// The maps in human form (what `netctl ebpf` prints): the attach points,
/// every frontend with its Service and backends, the affinity entries (aged
/// against `now_ns`, `CLOCK_MONOTONIC`), the north-south connections, and
/// each map's fill.
pub fn report(snap: &Snapshot, plan: &ServicePlan, now_ns: u64) -> Value {
    let image = &snap.image;
    let owners = owners(plan);
    let mut sets: BTreeMap<u32, Vec<Backend>> = BTreeMap::new();
    for (k, b) in &image.backends {
        sets.entry(k.set_id).or_default().push(*b);
    }

    // Frontends, grouped by Service.
    let mut rows: Vec<(FrontendOrder, Value)> = Vec::new();
    // Affinity group -> (Service, timeout).
    let mut groups: BTreeMap<u32, (String, u32)> = BTreeMap::new();
    for (k, v) in &image.services {
        let owner = owners.get(k);
        let serving = v.flags & (SVC_F_REJECT | SVC_F_DROP) == 0;
        let set: Vec<Backend> = if serving {
            sets.get(&v.set_id)
                .map(|s| s.iter().take(v.count as usize).copied().collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let slots: Option<Vec<usize>> = (v.flags & SVC_F_MAGLEV != 0).then(|| {
            let mut n = vec![0; set.len()];
            for i in image.maglev.get(&v.set_id).into_iter().flatten() {
                if let Some(c) = n.get_mut(*i as usize) {
                    *c += 1;
                }
            }
            n
        });
        let service = owner.map(|o| o.service.clone());
        if v.affinity_id != 0 {
            groups.entry(v.affinity_id).or_insert_with(|| {
                (
                    service.clone().unwrap_or_else(|| "?".into()),
                    v.affinity_timeout_s,
                )
            });
        }
        let row = json!({
            "frontend": frontend_name(k),
            "scope": scope_name(k.scope),
            "service": service,
            "kind": owner.map(|o| o.kind.clone()),
            "flags": flag_words(v.flags),
            "set": v.set_id,
            "backends": set.iter().map(backend_name).collect::<Vec<_>>(),
            "maglevSlots": slots,
            "affinity": (v.affinity_id != 0).then(|| json!({"group": v.affinity_id, "timeoutSeconds": v.affinity_timeout_s})),
            "matchesPlan": owner.is_some_and(|o| matches_plan(&o.spec, v, &set)),
        });
        let order = (
            // Frontends no planned Service wants last.
            service.unwrap_or_else(|| "~".into()),
            addr_of(k.addr_be),
            u16::from_be(k.port_be),
            k.proto,
            k.scope,
        );
        rows.push((order, row));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut missing: Vec<(String, Ipv4Addr, u16, u8, String)> = owners
        .iter()
        .filter(|(k, _)| !image.services.contains_key(k))
        .map(|(k, o)| {
            (
                o.service.clone(),
                addr_of(k.addr_be),
                u16::from_be(k.port_be),
                k.scope,
                format!("{} {} {}", o.service, frontend_name(k), scope_name(k.scope)),
            )
        })
        .collect();
    missing.sort();

    // Affinity entries, by Service then client.
    let mut affinity: Vec<((String, u64), Value)> = snap
        .affinity
        .iter()
        .map(|(k, v)| {
            let (service, timeout) = groups.get(&k.affinity_id).cloned().unzip();
            let client = if k.client & AFFINITY_CLIENT_IP != 0 {
                format!("client {}", addr_of(k.client as u32))
            } else {
                match snap.netns.get(&k.client) {
                    Some(who) => format!("netns cookie {} ({who})", k.client),
                    None => format!("netns cookie {}", k.client),
                }
            };
            let age_s = now_ns.saturating_sub(v.last_used_ns) / 1_000_000_000;
            let member = image.affinity_match.contains(&AffinityMatchKey {
                affinity_id: k.affinity_id,
                addr_be: v.addr_be,
                port_be: v.port_be,
                _pad: 0,
            });
            // As the programs judge it (ebpf/src/main.rs, `affine`).
            let state = match timeout {
                None => "no frontend uses the group",
                Some(_) if !member => "backend left (a new one is picked)",
                Some(t) if now_ns.saturating_sub(v.last_used_ns) > u64::from(t) * 1_000_000_000 => {
                    "expired (a new one is picked)"
                }
                Some(_) => "active",
            };
            let row = json!({
                "group": k.affinity_id,
                "service": service,
                "client": client,
                "backend": endpoint(v.addr_be, v.port_be),
                "ageSeconds": age_s,
                "timeoutSeconds": timeout,
                "state": state,
            });
            ((service.unwrap_or_default(), k.client), row)
        })
        .collect();
    affinity.sort_by(|a, b| a.0.cmp(&b.0));
    let affinity_omitted = affinity.len().saturating_sub(LISTED_MAX);
    affinity.truncate(LISTED_MAX);

    // Connections, by frontend then client.
    let mut conns = connections(&snap.connections);
    conns.sort_by_key(|c| {
        (
            addr_of(c.frontend.0),
            u16::from_be(c.frontend.1),
            addr_of(c.client.0),
            u16::from_be(c.client.1),
        )
    });
    let conns_omitted = conns.len().saturating_sub(LISTED_MAX);
    conns.truncate(LISTED_MAX);
    let conns: Vec<Value> = conns
        .iter()
        .map(|c| {
            let key = ServiceKey {
                addr_be: c.frontend.0,
                port_be: c.frontend.1,
                proto: c.proto,
                scope: SCOPE_EXTERNAL,
            };
            json!({
                "protocol": proto_name(c.proto),
                "client": endpoint(c.client.0, c.client.1),
                "frontend": endpoint(c.frontend.0, c.frontend.1),
                "backend": endpoint(c.backend.0, c.backend.1),
                "masqueradedAs": c.masquerade.map(|(a, p)| endpoint(a, p)),
                "via": c.via.map(|i| interface_name(&snap.interfaces, i)),
                "service": owners.get(&key).map(|o| o.service.clone()),
                "entries": c.entries,
            })
        })
        .collect();

    let maps = [
        (SERVICES_MAP, "frontends", image.services.len(), SERVICES_MAX_ENTRIES),
        (BACKENDS_MAP, "backends of all sets", image.backends.len(), BACKENDS_MAX_ENTRIES),
        (MAGLEV_MAP, "Maglev tables", image.maglev.len(), MAGLEV_MAX_ENTRIES),
        (AFFINITY_MAP, "affinity entries (LRU)", snap.affinity.len(), AFFINITY_MAX_ENTRIES),
        (
            AFFINITY_MATCH_MAP,
            "affinity group members",
            image.affinity_match.len(),
            AFFINITY_MATCH_MAX_ENTRIES,
        ),
        (SOCK_REV_MAP, "translated sockets (LRU)", snap.sock_rev, SOCK_REV_MAX_ENTRIES),
        (
            CT_MAP,
            "connection entries, two per connection (LRU)",
            snap.connections.len(),
            CT_MAX_ENTRIES,
        ),
        (NODE_MAP, "node configuration", usize::from(snap.node.is_some()), 1),
    ]
    .into_iter()
    .map(|(map, holds, entries, capacity)| {
        json!({"map": map, "holds": holds, "entries": entries, "capacity": capacity})
    })
    .collect::<Vec<_>>();

    let with_addr = |ifindex: u32, addr_be: u32| {
        let name = interface_name(&snap.interfaces, ifindex);
        if ifindex == 0 {
            name
        } else {
            format!("{name} (ifindex {ifindex}) {}", addr_of(addr_be))
        }
    };
    let node = snap.node.map(|n| {
        let addr = addr_of(n.node_addr_be);
        json!({
            "address": addr.to_string(),
            "uplink": snap.interfaces.iter().find(|i| i.addrs.contains(&addr)).map(|i| format!("{} (ifindex {})", i.name, i.ifindex)),
            "bridge": with_addr(n.bridge_ifindex, n.bridge_addr_be),
            "vxlan": with_addr(n.vxlan_ifindex, n.vxlan_addr_be),
        })
    });
    let tc: Vec<String> = snap
        .links
        .iter()
        .filter_map(|l| l.strip_prefix("tc-"))
        .map(|pinned| {
            // Pins name the interface with its dots as underscores (bpffs).
            snap.interfaces
                .iter()
                .find(|i| i.name.replace('.', "_") == pinned)
                .map_or_else(|| pinned.to_string(), |i| i.name.clone())
        })
        .collect();
    let (attached, detached): (Vec<&str>, Vec<&str>) = SOCKET_PROGRAMS
        .into_iter()
        .partition(|p| snap.links.iter().any(|l| l == p));

    json!({
        "dataplane": "ebpf",
        "pins": snap.pins.display().to_string(),
        "attach": {
            "cgroup": snap.cgroup.display().to_string(),
            "socketPrograms": attached,
            "socketProgramsMissing": detached,
            "tcIngress": tc,
        },
        "node": node,
        "frontends": rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "notInMaps": missing.into_iter().map(|m| m.4).collect::<Vec<_>>(),
        "affinity": affinity.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "connections": conns,
        "omitted": {"affinity": affinity_omitted, "connections": conns_omitted},
        "maps": maps,
        "maglevTableSize": MAGLEV_TABLE_SIZE,
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::fixtures::{backend, config, node_port_service, CLUSTER_IP, NODE};
    use super::super::super::plan::build;
    use super::super::reconcile::{FakeMaps, Reconciler};
    use super::*;
    use weft_model::{NodeView, ServiceEntry};

    const SECOND: u64 = 1_000_000_000;

    fn be(ip: &str) -> u32 {
        encode::addr_be(ip.parse().unwrap())
    }

    fn plan_of(services: Vec<ServiceEntry>) -> ServicePlan {
        let view = NodeView {
            rev: 1,
            synced: true,
            services: services.into_iter().map(|s| (s.key(), s)).collect(),
            nodes: BTreeMap::new(),
            pods: Default::default(),
        };
        build(&view, &config())
    }

    /// `default/web` (NodePort 30080, ClientIP affinity 10800s, one local
    /// and one remote backend) and `default/empty` (no endpoints), written
    /// by the reconciler as the agent writes them.
    fn fixture() -> (ServicePlan, Snapshot) {
        let mut web = node_port_service(
            "web",
            vec![
                backend("198.18.128.5", NODE, true, true, false),
                backend("198.18.129.5", "node-2", true, true, false),
            ],
        );
        web.affinity_timeout = Some(10800);
        let mut empty = node_port_service("empty", vec![]);
        empty.cluster_ips = vec!["198.19.0.21".parse().unwrap()];
        empty.ports[0].node_port = Some(30081);
        let plan = plan_of(vec![web, empty]);
        let mut maps = FakeMaps::default();
        Reconciler::adopt(&Image::default())
            .apply(&plan, &mut maps)
            .unwrap();
        let group = maps
            .image
            .services
            .values()
            .find(|v| v.affinity_id != 0)
            .unwrap()
            .affinity_id;
        let port = |p: u16| p.to_be();
        let snap = Snapshot {
            image: maps.image,
            affinity: vec![
                (
                    AffinityKey {
                        affinity_id: group,
                        _pad: 0,
                        client: 4097,
                    },
                    AffinityValue {
                        addr_be: be("198.18.128.5"),
                        port_be: port(8080),
                        _pad: 0,
                        last_used_ns: 100 * SECOND,
                    },
                ),
                (
                    AffinityKey {
                        affinity_id: group,
                        _pad: 0,
                        client: AFFINITY_CLIENT_IP | u64::from(be("198.19.255.9")),
                    },
                    AffinityValue {
                        addr_be: be("198.18.129.5"),
                        port_be: port(8080),
                        _pad: 0,
                        last_used_ns: 0,
                    },
                ),
            ],
            connections: vec![
                // 198.19.255.9:40000 -> the NodePort, masqueraded by the
                // bridge address towards the local backend.
                (
                    CtKey {
                        saddr_be: be("198.19.255.9"),
                        daddr_be: be("198.18.0.11"),
                        sport_be: port(40000),
                        dport_be: port(30080),
                        proto: 6,
                        dir: CT_FORWARD,
                        _pad: 0,
                    },
                    CtValue {
                        addr_a_be: be("198.18.128.5"),
                        addr_b_be: be("198.18.128.1"),
                        port_a_be: port(8080),
                        port_b_be: port(40000),
                        flags: CT_F_SNAT,
                        ifindex: 4,
                    },
                ),
                (
                    CtKey {
                        saddr_be: be("198.18.128.5"),
                        daddr_be: be("198.18.128.1"),
                        sport_be: port(8080),
                        dport_be: port(40000),
                        proto: 6,
                        dir: CT_REPLY,
                        _pad: 0,
                    },
                    CtValue {
                        addr_a_be: be("198.18.0.11"),
                        addr_b_be: be("198.19.255.9"),
                        port_a_be: port(30080),
                        port_b_be: port(40000),
                        flags: CT_F_SNAT,
                        ifindex: 2,
                    },
                ),
                // A reply entry whose forward entry the LRU evicted.
                (
                    CtKey {
                        saddr_be: be("198.18.129.5"),
                        daddr_be: be("198.18.128.0"),
                        sport_be: port(8080),
                        dport_be: port(41000),
                        proto: 6,
                        dir: CT_REPLY,
                        _pad: 0,
                    },
                    CtValue {
                        addr_a_be: be("198.18.0.11"),
                        addr_b_be: be("198.19.255.10"),
                        port_a_be: port(30080),
                        port_b_be: port(41000),
                        flags: CT_F_SNAT,
                        ifindex: 2,
                    },
                ),
            ],
            sock_rev: 3,
            node: Some(NodeConfig {
                node_addr_be: be("198.18.0.11"),
                bridge_ifindex: 4,
                bridge_addr_be: be("198.18.128.1"),
                vxlan_ifindex: 3,
                vxlan_addr_be: be("198.18.128.0"),
            }),
            pins: PathBuf::from("/sys/fs/bpf/weft/maps-v1"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            links: vec![
                "tc-eth0".into(),
                "tc-weft0".into(),
                "tc-weft_1".into(),
                "weft_connect4".into(),
                "weft_getpeername4".into(),
                "weft_sendmsg4".into(),
            ],
            interfaces: vec![
                Interface {
                    name: "eth0".into(),
                    ifindex: 2,
                    addrs: vec!["198.18.0.11".parse().unwrap()],
                },
                Interface {
                    name: "weft.1".into(),
                    ifindex: 3,
                    addrs: vec!["198.18.128.0".parse().unwrap()],
                },
                Interface {
                    name: "weft0".into(),
                    ifindex: 4,
                    addrs: vec!["198.18.128.1".parse().unwrap()],
                },
            ],
            netns: BTreeMap::from([(4097, "pod default/client-1".to_string())]),
        };
        (plan, snap)
    }

    fn frontend<'a>(v: &'a Value, name: &str, scope: &str) -> &'a Value {
        v["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["frontend"] == name && f["scope"] == scope)
            .unwrap_or_else(|| panic!("no frontend {name} {scope} in {v:#}"))
    }

    #[test]
    fn frontends_name_their_service_backends_and_flags() {
        let (plan, snap) = fixture();
        let v = report(&snap, &plan, 103 * SECOND);
        let cip = format!("{CLUSTER_IP}:80/TCP");
        let f = frontend(&v, &cip, "socket");
        assert_eq!(f["service"], "default/web");
        assert_eq!(f["kind"], "ClusterIP");
        assert_eq!(
            f["backends"],
            json!(["198.18.128.5:8080 (local)", "198.18.129.5:8080"])
        );
        assert_eq!(f["flags"], json!([]));
        assert_eq!(f["affinity"]["timeoutSeconds"], 10800);
        assert_eq!(f["matchesPlan"], true);
        // The cluster IP from outside the node is masqueraded.
        assert_eq!(frontend(&v, &cip, "external")["flags"], json!(["snat"]));
        let np = frontend(&v, "198.18.0.11:30080/TCP", "external");
        assert_eq!(
            (np["kind"].as_str(), np["service"].as_str()),
            (Some("NodePort"), Some("default/web"))
        );
        // No endpoints: refused, no backends, no affinity.
        let e = frontend(&v, "198.19.0.21:80/TCP", "socket");
        assert_eq!(e["service"], "default/empty");
        assert_eq!(e["flags"], json!(["reject"]));
        assert_eq!(e["backends"], json!([]));
        assert!(e["affinity"].is_null());
        // Grouped by Service: default/empty's four entries first.
        let services: Vec<&str> = v["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["service"].as_str().unwrap())
            .collect();
        assert_eq!(
            services,
            ["default/empty"; 4]
                .into_iter()
                .chain(["default/web"; 4])
                .collect::<Vec<_>>()
        );
        assert_eq!(v["notInMaps"], json!([]));
    }

    #[test]
    fn frontends_the_plan_does_not_want_or_that_differ_are_marked() {
        let (plan, mut snap) = fixture();
        let cip = ServiceKey {
            addr_be: be(CLUSTER_IP),
            port_be: 80u16.to_be(),
            proto: 6,
            scope: SCOPE_SOCKET,
        };
        // A stale frontend nobody plans, and web's entry without affinity.
        let stale = ServiceKey {
            addr_be: be("198.19.0.99"),
            ..cip
        };
        let mut v = snap.image.services[&cip];
        snap.image.services.insert(stale, v);
        v.affinity_id = 0;
        snap.image.services.insert(cip, v);
        let got = report(&snap, &plan, 0);
        let f = frontend(&got, "198.19.0.99:80/TCP", "socket");
        assert!(f["service"].is_null());
        assert_eq!(f["matchesPlan"], false);
        assert_eq!(
            got["frontends"].as_array().unwrap().last().unwrap()["frontend"],
            "198.19.0.99:80/TCP"
        );
        assert_eq!(
            frontend(&got, &format!("{CLUSTER_IP}:80/TCP"), "socket")["matchesPlan"],
            false
        );
        // And one the plan wants that the maps lack.
        snap.image.services.remove(&ServiceKey {
            scope: SCOPE_EXTERNAL,
            ..cip
        });
        let got = report(&snap, &plan, 0);
        assert_eq!(
            got["notInMaps"],
            json!([format!("default/web {CLUSTER_IP}:80/TCP external")])
        );
    }

    #[test]
    fn affinity_entries_name_the_client_and_age() {
        let (plan, snap) = fixture();
        let v = report(&snap, &plan, 103 * SECOND);
        let a = v["affinity"].as_array().unwrap();
        assert_eq!(a.len(), 2);
        let pod = a
            .iter()
            .find(|e| e["backend"] == "198.18.128.5:8080")
            .unwrap();
        assert_eq!(pod["client"], "netns cookie 4097 (pod default/client-1)");
        assert_eq!(pod["service"], "default/web");
        assert_eq!(pod["ageSeconds"], 3);
        assert_eq!(pod["timeoutSeconds"], 10800);
        assert_eq!(pod["state"], "active");
        let ext = a
            .iter()
            .find(|e| e["backend"] == "198.18.129.5:8080")
            .unwrap();
        assert_eq!(ext["client"], "client 198.19.255.9");
        assert_eq!(ext["ageSeconds"], 103);

        // Past the timeout, and with the backend gone from the group.
        let v = report(&snap, &plan, 10_801 * SECOND);
        let ext = v["affinity"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["backend"] == "198.18.129.5:8080")
            .unwrap();
        assert_eq!(ext["state"], "expired (a new one is picked)");
        let mut snap = snap;
        snap.image
            .affinity_match
            .retain(|m| m.addr_be != be("198.18.128.5"));
        let v = report(&snap, &plan, 103 * SECOND);
        let pod = v["affinity"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["backend"] == "198.18.128.5:8080")
            .unwrap();
        assert_eq!(pod["state"], "backend left (a new one is picked)");
    }

    #[test]
    fn connections_pair_forward_and_reply() {
        let (plan, snap) = fixture();
        let v = report(&snap, &plan, 0);
        assert_eq!(
            v["connections"],
            json!([
                {"protocol": "TCP", "client": "198.19.255.9:40000", "frontend": "198.18.0.11:30080",
                 "backend": "198.18.128.5:8080", "masqueradedAs": "198.18.128.1:40000",
                 "via": "weft0", "service": "default/web", "entries": "both"},
                {"protocol": "TCP", "client": "198.19.255.10:41000", "frontend": "198.18.0.11:30080",
                 "backend": "198.18.129.5:8080", "masqueradedAs": "198.18.128.0:41000",
                 "via": null, "service": "default/web", "entries": "reply only"},
            ])
        );
    }

    #[test]
    fn header_and_map_counts() {
        let (plan, snap) = fixture();
        let v = report(&snap, &plan, 0);
        assert_eq!(v["dataplane"], "ebpf");
        assert_eq!(
            v["attach"]["socketPrograms"],
            json!(["weft_connect4", "weft_sendmsg4", "weft_getpeername4"])
        );
        assert_eq!(
            v["attach"]["socketProgramsMissing"],
            json!(["weft_recvmsg4"])
        );
        assert_eq!(v["attach"]["tcIngress"], json!(["eth0", "weft0", "weft.1"]));
        assert_eq!(
            v["node"],
            json!({"address": "198.18.0.11", "uplink": "eth0 (ifindex 2)",
                   "bridge": "weft0 (ifindex 4) 198.18.128.1", "vxlan": "weft.1 (ifindex 3) 198.18.128.0"})
        );
        let count = |map: &str| {
            let m = v["maps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["map"] == map)
                .unwrap();
            (
                m["entries"].as_u64().unwrap(),
                m["capacity"].as_u64().unwrap(),
            )
        };
        // web: cluster IP and NodePort, two scopes each; empty: the same.
        assert_eq!(count(SERVICES_MAP), (8, u64::from(SERVICES_MAX_ENTRIES)));
        // One set (web's frontends share it) of two.
        assert_eq!(count(BACKENDS_MAP), (2, u64::from(BACKENDS_MAX_ENTRIES)));
        assert_eq!(count(AFFINITY_MAP).0, 2);
        assert_eq!(count(AFFINITY_MATCH_MAP).0, 2);
        assert_eq!(count(SOCK_REV_MAP), (3, u64::from(SOCK_REV_MAX_ENTRIES)));
        assert_eq!(count(CT_MAP), (3, u64::from(CT_MAX_ENTRIES)));
        assert_eq!(count(NODE_MAP), (1, 1));
        assert_eq!(v["omitted"], json!({"affinity": 0, "connections": 0}));
    }

    #[test]
    fn maglev_frontends_count_each_backends_slots() {
        let mut web = node_port_service(
            "web",
            vec![
                backend("198.18.128.5", NODE, true, true, false),
                backend("198.18.129.5", "node-2", true, true, false),
            ],
        );
        web.options
            .insert(encode::LB_OPTION.into(), "maglev".into());
        let plan = plan_of(vec![web]);
        let mut maps = FakeMaps::default();
        Reconciler::adopt(&Image::default())
            .apply(&plan, &mut maps)
            .unwrap();
        let snap = Snapshot {
            image: maps.image,
            ..Default::default()
        };
        let v = report(&snap, &plan, 0);
        let f = frontend(&v, &format!("{CLUSTER_IP}:80/TCP"), "socket");
        assert_eq!(f["flags"], json!(["maglev"]));
        let slots: Vec<u64> = f["maglevSlots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.iter().sum::<u64>(), u64::from(MAGLEV_TABLE_SIZE));
        assert!(slots.iter().all(|s| *s > 400), "{slots:?}");
        assert_eq!(f["matchesPlan"], true);
    }

    #[test]
    fn lists_are_capped_but_counted() {
        let (plan, mut snap) = fixture();
        let (k, v) = snap.affinity[0];
        snap.affinity = (0..LISTED_MAX as u64 + 5)
            .map(|c| (AffinityKey { client: c, ..k }, v))
            .collect();
        let got = report(&snap, &plan, 0);
        assert_eq!(got["affinity"].as_array().unwrap().len(), LISTED_MAX);
        assert_eq!(got["omitted"]["affinity"], 5);
    }

    #[test]
    fn this_threads_netns_has_a_cookie() {
        // SO_NETNS_COOKIE exists since Linux 5.14; the socket programs'
        // affinity keys are these cookies.
        match netns_cookie() {
            Ok(c) => assert_ne!(c, 0),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOPROTOOPT), "{e}"),
        }
    }
}
