//! weft-agent: joins the cluster (registers or refreshes its Node) and follows
//! the control plane's push stream. The overlay, dataplanes and DNS that act on
//! the view are wired here as they land.

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hyper::Method;
use ipnetwork::Ipv4Network;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use weft_agent::client::{ClientError, Endpoint};
use weft_agent::node;
use weft_agent::overlay::{self, netlink::NetlinkLinks, Links};
use weft_model::NodeView;

#[derive(Parser, Debug)]
#[command(name = "weft-agent", version, about = "weft node agent")]
struct Args {
    /// Control plane URL.
    #[arg(long, env = "WEFT_SERVER", default_value = "http://127.0.0.1:6443")]
    server: String,
    /// File holding this node's bearer token.
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Bearer token (prefer --token-file).
    #[arg(long, env = "WEFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// This node's name.
    #[arg(long, env = "WEFT_NODE_NAME")]
    node_name: String,
    /// This node's underlay address (also its VXLAN endpoint).
    #[arg(long, env = "WEFT_NODE_IP")]
    node_ip: Ipv4Addr,
    /// The cluster (pod) CIDR: traffic leaving it is masqueraded.
    #[arg(long, env = "WEFT_CLUSTER_CIDR", default_value = "10.244.0.0/16")]
    cluster_cidr: Ipv4Network,
    /// Cluster DNS service address given to pods.
    #[arg(long, env = "WEFT_CLUSTER_DNS", default_value = "10.96.0.10")]
    cluster_dns: IpAddr,
    /// Cluster domain.
    #[arg(long, env = "WEFT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Where the node state for the CNI plugin is written.
    #[arg(long, env = "WEFT_NODE_STATE", default_value = "/run/weft/node.json")]
    node_state: PathBuf,
    /// Underlay MTU; detected from the interface holding --node-ip when unset.
    #[arg(long, env = "WEFT_UNDERLAY_MTU")]
    underlay_mtu: Option<u32>,
    /// Reconcile the kernel at least this often, even without changes.
    #[arg(long, env = "WEFT_RESYNC_SECONDS", default_value_t = 5)]
    resync_seconds: u64,
    /// Unix socket where the CNI plugin reports pods.
    #[arg(
        long,
        env = "WEFT_AGENT_SOCKET",
        default_value = "/run/weft/agent.sock"
    )]
    socket: PathBuf,
    /// The CNI plugin's IPAM directory for this node's network (`<ipamDir>/<network name>`):
    /// pods wired while the agent was away are found there.
    #[arg(long, env = "WEFT_IPAM_DIR", default_value = "/var/lib/weft/ipam/weft")]
    ipam_dir: PathBuf,
    /// CIDRs in which Services' externalIPs are honoured (CVE-2020-8554: none by default).
    #[arg(long, env = "WEFT_EXTERNAL_IP_ALLOW", value_delimiter = ',')]
    external_ip_allow: Vec<ipnetwork::IpNetwork>,
    /// Do not program the overlay (follow the stream only).
    #[arg(long, env = "WEFT_NO_OVERLAY")]
    no_overlay: bool,
    /// The service dataplane (none: Services are not programmed).
    #[arg(long, env = "WEFT_DATAPLANE", value_enum, default_value_t = DataplaneKind::Iptables)]
    dataplane: DataplaneKind,
    /// cgroup v2 directory the eBPF socket programs attach to (its processes
    /// and their descendants get socket-level load balancing); default: the
    /// cgroup v2 root (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
    #[arg(long, env = "WEFT_CGROUP_PATH")]
    cgroup_path: Option<PathBuf>,
    /// bpffs directory for the eBPF dataplane's pinned maps and links (a bpf
    /// filesystem is mounted there if it is not on one).
    #[arg(long, env = "WEFT_BPFFS_PATH", default_value = "/sys/fs/bpf/weft")]
    bpffs_path: PathBuf,
    /// iptables implementation: auto follows the host (the one holding more rules, ties to nft).
    #[arg(long, env = "WEFT_IPTABLES_MODE", value_enum, default_value_t = IptablesMode::Auto)]
    iptables_mode: IptablesMode,
    /// Check the kernel for outside changes to our rules this often.
    #[arg(long, env = "WEFT_CHECK_SECONDS", default_value_t = 5)]
    check_seconds: u64,
    /// Rewrite every rule this often, even without changes.
    #[arg(long, env = "WEFT_FULL_RESYNC_SECONDS", default_value_t = 3600)]
    full_resync_seconds: u64,
    /// Also answer NodePorts on 127.0.0.1 (only the NodePort rules change; route_localnet is never set).
    #[arg(long, env = "WEFT_LOCALHOST_NODEPORTS")]
    localhost_node_ports: bool,
    /// Address of /healthz, /livez and /metrics.
    #[arg(long, env = "WEFT_HEALTH_LISTEN", default_value = "0.0.0.0:10256")]
    health_listen: std::net::SocketAddr,
    /// /healthz answers 503 once an update has waited longer than this.
    #[arg(long, env = "WEFT_HEALTHZ_TIMEOUT_SECONDS", default_value_t = 30)]
    healthz_timeout_seconds: u64,
    /// Do not serve cluster DNS on this node (pods then need another server
    /// on --cluster-dns).
    #[arg(long, env = "WEFT_NO_DNS")]
    no_dns: bool,
    /// TTL of cluster DNS records, seconds.
    #[arg(long, env = "WEFT_DNS_TTL", default_value_t = 5)]
    dns_ttl: u32,
    /// Pod records `a-b-c-d.<ns>.pod.<zone>`: disabled, insecure (any
    /// address), verified (only addresses of pods in that namespace).
    #[arg(long, env = "WEFT_DNS_POD_RECORDS", value_enum, default_value_t = weft_dns::PodRecords::Disabled)]
    dns_pod_records: weft_dns::PodRecords,
    /// Upstream servers for names outside the cluster (default: the
    /// nameservers of --dns-resolv-conf, loopback ones rejected).
    #[arg(long, env = "WEFT_DNS_UPSTREAM", value_delimiter = ',')]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// Where the node's upstream servers and search domains come from.
    #[arg(long, env = "WEFT_DNS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    dns_resolv_conf: PathBuf,
    /// Most TCP connections the DNS server keeps at once.
    #[arg(long, env = "WEFT_DNS_TCP_CONNECTIONS", default_value_t = 256)]
    dns_tcp_connections: usize,
    /// A DNS TCP connection without a complete query for this long is closed.
    #[arg(long, env = "WEFT_DNS_TCP_IDLE_SECONDS", default_value_t = 10)]
    dns_tcp_idle_seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DataplaneKind {
    Ebpf,
    Iptables,
    None,
}

/// The cgroup v2 root: /sys/fs/cgroup on unified hosts, its `unified`
/// mount on hybrid ones.
fn cgroup2_root() -> anyhow::Result<PathBuf> {
    for dir in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if std::path::Path::new(dir)
            .join("cgroup.controllers")
            .exists()
        {
            return Ok(PathBuf::from(dir));
        }
    }
    anyhow::bail!(
        "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified; pass --cgroup-path"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum IptablesMode {
    Auto,
    Nft,
    Legacy,
}

/// The iptables implementation to use, logged with the dataplane choice.
fn iptables_mode(args: &Args) -> weft_agent::dataplane::netfilter::Mode {
    use weft_agent::dataplane::netfilter::Mode;
    let mode = match args.iptables_mode {
        IptablesMode::Auto => Mode::detect(),
        IptablesMode::Nft => Mode::Nft,
        IptablesMode::Legacy => Mode::Legacy,
    };
    tracing::info!(
        dataplane = ?args.dataplane,
        iptables_mode = mode.as_str(),
        chosen = if args.iptables_mode == IptablesMode::Auto { "by the host's rules" } else { "by flag" },
        "service dataplane"
    );
    mode
}

fn main() {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = run(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Create the Node, or keep the existing one (and its podCIDR), then report it Ready.
async fn register(ep: &Endpoint, name: &str, ip: IpAddr) -> anyhow::Result<()> {
    let path = format!("/api/v1/nodes/{name}");
    let mac = overlay::format_mac(&overlay::vtep_mac(name));
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"weft.dev/vtep-ip": ip.to_string(), "weft.dev/vtep-mac": mac}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}
    });
    match ep.call(Method::GET, &path, None).await {
        Ok(_) => {}
        Err(ClientError::Status { code: 404, .. }) => {
            ep.call(
                Method::POST,
                "/api/v1/nodes",
                Some(Bytes::from(node.to_string())),
            )
            .await
            .context("registering the Node")?;
        }
        Err(e) => return Err(e).context("looking up the Node"),
    }
    let (_, cur) = ep.call(Method::GET, &path, None).await?;
    let mut cur: serde_json::Value = serde_json::from_slice(&cur)?;
    // Keep the VTEP annotations current (an address change, or a Node created by hand).
    let ann = &cur["metadata"]["annotations"];
    if ann["weft.dev/vtep-ip"] != ip.to_string().as_str()
        || ann["weft.dev/vtep-mac"] != mac.as_str()
    {
        cur["metadata"]["annotations"]["weft.dev/vtep-ip"] = ip.to_string().into();
        cur["metadata"]["annotations"]["weft.dev/vtep-mac"] = mac.clone().into();
        let (_, updated) = ep
            .call(Method::PUT, &path, Some(Bytes::from(cur.to_string())))
            .await
            .context("updating the Node's VTEP annotations")?;
        cur = serde_json::from_slice(&updated)?;
    }
    cur["status"] = serde_json::json!({
        "addresses": [{"type": "InternalIP", "address": ip.to_string()}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "WeftAgentReady", "message": "weft-agent is following the control plane"}],
    });
    ep.call(
        Method::PUT,
        &format!("{path}/status"),
        Some(Bytes::from(cur.to_string())),
    )
    .await
    .context("reporting the Node ready")?;
    Ok(())
}

/// The overlay and node setup, reconciled on every view change and on a timer.
struct NodeLoop {
    cfg: overlay::OverlayConfig,
    links: NetlinkLinks,
    cluster: Ipv4Network,
    /// iptables of the host's mode (the pod masquerade chain).
    ipt: weft_agent::dataplane::netfilter::Iptables,
    dns: node::DnsConfig,
    state_path: PathBuf,
    last_error: Option<String>,
    /// The nodes of the view last reconciled: the overlay depends on nothing
    /// else, so a view change that leaves them alone (a Service) costs nothing.
    last_nodes: Option<std::collections::BTreeMap<String, weft_model::NodeEntry>>,
}

impl NodeLoop {
    async fn new(
        args: &Args,
        mode: weft_agent::dataplane::netfilter::Mode,
    ) -> anyhow::Result<NodeLoop> {
        let links = NetlinkLinks::new().context("opening netlink")?;
        let underlay_mtu = match args.underlay_mtu {
            Some(m) => m,
            None => links.mtu_of_address(args.node_ip).await?.with_context(|| {
                format!(
                    "no interface holds --node-ip {}; pass --underlay-mtu or fix the address",
                    args.node_ip
                )
            })?,
        };
        node::ensure_forwarding().context("enabling IP forwarding")?;
        Ok(NodeLoop {
            cfg: overlay::OverlayConfig {
                node: args.node_name.clone(),
                node_ip: args.node_ip,
                underlay_mtu,
            },
            links,
            cluster: args.cluster_cidr,
            ipt: weft_agent::dataplane::netfilter::Iptables { mode },
            dns: node::DnsConfig {
                nameserver: args.cluster_dns,
                domain: args.cluster_domain.clone(),
            },
            state_path: args.node_state.clone(),
            last_error: None,
            last_nodes: None,
        })
    }

    fn report(&mut self, err: Option<String>) {
        if err != self.last_error {
            match &err {
                Some(e) => tracing::warn!(error = %e, "node not in its desired state"),
                None if self.last_error.is_some() => {
                    tracing::info!("node back in its desired state")
                }
                None => {}
            }
            self.last_error = err;
        }
    }

    /// The overlay as `netctl overlay` shows it.
    async fn describe(&self, view: &weft_agent::sync::SharedView) -> serde_json::Value {
        let planned = {
            let v = view.read().unwrap_or_else(|p| p.into_inner());
            overlay::plan(&v, &self.cfg)
        };
        let have = match self.links.observe().await {
            Ok(h) => h,
            Err(e) => return serde_json::json!({"node": self.cfg.node, "error": e.to_string()}),
        };
        match planned {
            Ok((want, _)) => overlay::describe(
                &self.cfg.node,
                Some(&want),
                &have,
                self.last_error.as_deref(),
            ),
            Err(e) => overlay::describe(&self.cfg.node, None, &have, Some(&e.to_string())),
        }
    }

    /// Reconcile the node. `force` (the resync timer) checks the kernel even
    /// when the nodes did not change, which is what repairs outside damage.
    async fn sync(&mut self, view: &weft_agent::sync::SharedView, force: bool) {
        let planned = {
            let v = view.read().unwrap_or_else(|p| p.into_inner());
            if !v.synced || (!force && self.last_nodes.as_ref() == Some(&v.nodes)) {
                return;
            }
            self.last_nodes = Some(v.nodes.clone());
            overlay::plan(&v, &self.cfg)
        };
        let (want, skipped) = match planned {
            Ok(p) => p,
            Err(e) => return self.report(Some(e.to_string())),
        };
        for s in &skipped {
            tracing::debug!(peer = %s, "peer not programmed yet");
        }
        let mut errors = Vec::new();
        match overlay::reconcile(&self.links, &want).await {
            Ok(out) => {
                if !out.applied.is_empty() {
                    tracing::info!(
                        ops = out.applied.len(),
                        peers = want.peers.len(),
                        "overlay reconciled"
                    );
                    for op in &out.applied {
                        tracing::debug!(?op, "applied");
                    }
                }
                errors.extend(out.errors);
            }
            Err(e) => errors.push(e.to_string()),
        }
        let (ipt, cluster) = (self.ipt.clone(), self.cluster);
        match tokio::task::spawn_blocking(move || node::ensure_masquerade(&ipt, cluster)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("masquerade task: {e}")),
        }
        match node::write_atomic(
            &self.state_path,
            &node::node_state(&want, self.cluster, &self.dns),
        ) {
            Ok(true) => {
                tracing::info!(path = %self.state_path.display(), subnet = %want.subnet, "node state written")
            }
            Ok(false) => {}
            Err(e) => errors.push(e.to_string()),
        }
        self.report((!errors.is_empty()).then(|| errors.join("; ")));
    }
}

/// Serve cluster DNS on the cluster DNS address inside this node, fed from
/// the view.
async fn start_dns(
    args: &Args,
    view: weft_agent::sync::SharedView,
    revs: tokio::sync::watch::Receiver<u64>,
    changes: weft_agent::sync::SharedChanges,
) -> anyhow::Result<std::sync::Arc<weft_dns::ClusterDns>> {
    use weft_dns::forward::{ForwardConfig, Forwarder};
    let zone = weft_dns::ZoneConfig::new(
        &args.cluster_domain,
        args.dns_ttl,
        args.dns_pod_records,
        vec![args.cluster_dns],
    )
    .context("--cluster-domain / --dns-ttl")?;
    let (upstreams, search) = if args.dns_upstream.is_empty() {
        match weft_dns::resolv_conf::load_excluding(&args.dns_resolv_conf, &[args.cluster_dns]) {
            Ok(rc) => {
                for (ip, why) in &rc.rejected {
                    tracing::warn!(%ip, why, resolv_conf = %args.dns_resolv_conf.display(), "DNS upstream rejected");
                }
                (rc.upstreams, rc.search)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no DNS upstreams: names outside the cluster get REFUSED");
                (Vec::new(), Vec::new())
            }
        }
    } else {
        (args.dns_upstream.clone(), Vec::new())
    };
    let search = weft_dns::handler::host_search(&search, &zone.zone);
    let forwarder = (!upstreams.is_empty()).then(|| {
        std::sync::Arc::new(Forwarder::new(ForwardConfig {
            upstreams: upstreams.clone(),
            ..Default::default()
        }))
    });
    let dns = std::sync::Arc::new(weft_dns::ClusterDns::new(
        weft_dns::Snapshot::new(zone),
        forwarder,
        search,
    ));
    let limits = weft_dns::server::Limits {
        tcp_connections: args.dns_tcp_connections.max(1),
        tcp_idle: std::time::Duration::from_secs(args.dns_tcp_idle_seconds.max(1)),
        ..Default::default()
    };
    // The cluster DNS address only (design: never every address of the node).
    let listen = [std::net::SocketAddr::new(args.cluster_dns, 53)];
    let (cluster_dns, domain) = (args.cluster_dns, args.cluster_domain.clone());
    let serving = dns.clone();
    // The address and the sockets are retried, never fatal: an agent that
    // cannot serve DNS (port 53 taken, netlink refused) still runs the
    // overlay and the Services, and says why every time it tries again.
    tokio::spawn(async move {
        let mut delay = std::time::Duration::from_secs(1);
        loop {
            let started = async {
                weft_agent::dns_host::ensure_address(cluster_dns)
                    .await
                    .with_context(|| {
                        format!(
                            "putting the cluster DNS address {cluster_dns} on {}",
                            weft_agent::dns_host::DNS_LINK
                        )
                    })?;
                anyhow::Ok(
                    weft_dns::server::Server::bind(serving.clone(), &listen, limits.clone())
                        .await?,
                )
            }
            .await;
            match started {
                Ok(mut server) => {
                    tracing::info!(listen = ?server.udp, upstreams = ?upstreams, zone = %domain, "cluster DNS serving");
                    delay = std::time::Duration::from_secs(1);
                    server.wait().await;
                    tracing::error!("cluster DNS listeners ended; starting them again");
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_s = delay.as_secs(), "cluster DNS cannot serve yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
    });
    tokio::spawn(weft_agent::dns_host::follow(
        dns.clone(),
        view,
        revs,
        changes,
    ));
    Ok(dns)
}

fn run(args: Args) -> anyhow::Result<()> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .to_string(),
        (None, None) => anyhow::bail!("a token is required: --token-file or WEFT_TOKEN"),
    };
    let ep = Endpoint::parse(&args.server, &token)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        register(&ep, &args.node_name, IpAddr::V4(args.node_ip)).await?;
        tracing::info!(node = %args.node_name, "registered");
        let view: weft_agent::sync::SharedView = Arc::new(RwLock::new(NodeView::default()));
        let (tx, mut rx) = tokio::sync::watch::channel(0u64);
        let service_changes = weft_agent::sync::SharedChanges::default();
        let dns_changes = weft_agent::sync::SharedChanges::default();
        tokio::spawn(weft_agent::sync::follow(
            ep.clone(),
            args.node_name.clone(),
            view.clone(),
            tx,
            vec![service_changes.clone(), dns_changes.clone()],
        ));
        let dns = if args.no_dns {
            None
        } else {
            Some(start_dns(&args, view.clone(), rx.clone(), dns_changes).await?)
        };
        let (reports_tx, mut reports) = tokio::sync::mpsc::channel(1024);
        let reports_tx_late = reports_tx.clone();
        let (queries_tx, mut queries) = tokio::sync::mpsc::channel::<weft_agent::local_api::Query>(16);
        weft_agent::local_api::listen(&args.socket, reports_tx, queries_tx)?;
        // Pods wired while the agent was away: re-read the plugin's claims now and then.
        let claims_tx = reports_tx_late.clone();
        let ipam_dir = args.ipam_dir.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                tick.tick().await;
                let current = weft_agent::local_api::claims(&ipam_dir);
                // Forget claims that are gone, so a pod re-created with the same
                // name and address is reported again.
                let keys: std::collections::HashSet<_> =
                    current.iter().map(|r| (r.pod_namespace.clone(), r.pod_name.clone(), r.ip.clone())).collect();
                seen.retain(|k| keys.contains(k));
                for r in current {
                    if seen.insert((r.pod_namespace.clone(), r.pod_name.clone(), r.ip.clone())) {
                        let _ = claims_tx.send(r).await;
                    }
                }
            }
        });
        let rep_ep = ep.clone();
        let dataplane_poke = Arc::new(tokio::sync::Notify::new());
        let poke = dataplane_poke.clone();
        tokio::spawn(async move {
            while let Some(r) = reports.recv().await {
                let mut delay = std::time::Duration::from_millis(100);
                for attempt in 1..=5 {
                    // A pod came or went: its hostPorts (in the plugin's claims) may have too.
                    if attempt == 1 {
                        poke.notify_one();
                    }
                    match weft_agent::local_api::report(&rep_ep, &r).await {
                        Ok(outcome) => {
                            let pod = format!("{}/{}", r.pod_namespace, r.pod_name);
                            match outcome {
                                weft_agent::local_api::Reported::Updated => {
                                    tracing::info!(op = %r.op, %pod, ip = r.address(), "pod status reported")
                                }
                                weft_agent::local_api::Reported::Unchanged => {
                                    tracing::debug!(op = %r.op, %pod, "pod status already current")
                                }
                                weft_agent::local_api::Reported::NotAPod => tracing::debug!(
                                    op = %r.op, container = %r.container_id, ip = r.address(),
                                    "not a Kubernetes pod (no pod name/namespace, or unknown to the API); nothing reported"
                                ),
                            }
                            break;
                        }
                        Err(e) if attempt == 5 => tracing::warn!(error = %e, pod = %r.pod_name, "could not report the pod"),
                        Err(_) => {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
            }
        });
        let plan_cfg = weft_agent::dataplane::plan::PlanConfig {
            node: args.node_name.clone(),
            node_addresses: vec![IpAddr::V4(args.node_ip)],
            localhost_node_ports: args.localhost_node_ports,
            external_ip_allow: args.external_ip_allow.clone(),
            cluster_cidr: args.cluster_cidr.into(),
            local_dns: (!args.no_dns).then_some(args.cluster_dns),
        };
        let health = Arc::new(weft_agent::health::Health::new(
            std::time::Duration::from_secs(args.healthz_timeout_seconds.max(1)),
        ));
        let metrics = Arc::new(weft_agent::health::Metrics::default());
        if let Some(dns) = &dns {
            metrics.set_dns(dns.clone());
        }
        let listener = tokio::net::TcpListener::bind(args.health_listen)
            .await
            .with_context(|| format!("binding --health-listen {}", args.health_listen))?;
        tokio::spawn(weft_agent::health::serve(listener, health.clone(), metrics.clone()));
        let mode = iptables_mode(&args);
        // Where `netctl ebpf` reads the eBPF dataplane's maps (None: another dataplane).
        let mut ebpf_report: Option<weft_agent::dataplane::ebpf::EbpfConfig> = None;
        if args.dataplane != DataplaneKind::None {
            let mut dp = weft_agent::dataplane::netfilter::IptablesDataplane::new(mode, args.cluster_cidr.to_string());
            dp.localhost_node_ports = args.localhost_node_ports;
            let cfg = weft_agent::dataplane::driver::DriverConfig {
                plan: plan_cfg.clone(),
                ipam_dir: args.ipam_dir.clone(),
                check_every: std::time::Duration::from_secs(args.check_seconds.max(1)),
                full_every: std::time::Duration::from_secs(args.full_resync_seconds.max(60)),
            };
            let shared = weft_agent::dataplane::driver::Shared {
                view: view.clone(),
                changes: rx.clone(),
                service_changes: Some(service_changes.clone()),
                poke: dataplane_poke.clone(),
                health: health.clone(),
                metrics: metrics.clone(),
            };
            if args.dataplane == DataplaneKind::Ebpf {
                let ebpf = weft_agent::dataplane::ebpf::EbpfConfig {
                    cgroup: match &args.cgroup_path {
                        Some(p) => p.clone(),
                        None => cgroup2_root()?,
                    },
                    bpffs: args.bpffs_path.clone(),
                    tc: Some(weft_agent::dataplane::ebpf::kernel::TcInterfaces {
                        node_addr: args.node_ip,
                        bridge: weft_agent::overlay::BRIDGE.to_string(),
                        vxlan: weft_agent::overlay::VXLAN.to_string(),
                    }),
                    ipam_dir: Some(args.ipam_dir.clone()),
                };
                tracing::info!(cgroup = %ebpf.cgroup.display(), bpffs = %ebpf.bpffs.display(), "eBPF dataplane (hostPorts with iptables)");
                ebpf_report = Some(ebpf.clone());
                // hostPorts stay iptables chains: the iptables dataplane,
                // programmed with only the refusals of frontends without
                // endpoints (see EbpfDataplane::program).
                let ebpf = weft_agent::dataplane::ebpf::EbpfDataplane::new(ebpf, dp);
                tokio::spawn(weft_agent::dataplane::driver::run(ebpf, cfg, shared));
            } else {
                tokio::spawn(weft_agent::dataplane::driver::run(dp, cfg, shared));
            }
        }
        if args.dataplane != DataplaneKind::Ebpf {
            // Switched away from eBPF: its programs would keep translating
            // from stale maps. Removing the pins detaches them.
            match weft_agent::dataplane::ebpf::kernel::remove_pins(&args.bpffs_path) {
                Ok(true) => tracing::info!(bpffs = %args.bpffs_path.display(), "removed the eBPF dataplane's programs and maps left by an earlier run"),
                Ok(false) => {}
                Err(e) => tracing::warn!(bpffs = %args.bpffs_path.display(), error = %e, "could not remove the eBPF dataplane's pins"),
            }
        }
        let mut node = if args.no_overlay { None } else { Some(NodeLoop::new(&args, mode).await?) };
        let mut resync = tokio::time::interval(std::time::Duration::from_secs(args.resync_seconds.max(1)));
        loop {
            let mut force = false;
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() { break; }
                    rx.borrow_and_update();
                    let v = view.read().unwrap_or_else(|p| p.into_inner());
                    let subnet = v.nodes.get(&args.node_name).map(|n| n.pod_cidrs.join(",")).unwrap_or_default();
                    tracing::info!(rev = v.rev, services = v.services.len(), nodes = v.nodes.len(), subnet, "view updated");
                    if v.synced {
                        // A Node being deleted takes no new load-balanced traffic
                        // (kube-proxy's nodeEligible: /healthz answers 503).
                        health.set_node_eligible(v.nodes.contains_key(&args.node_name));
                    }
                    if args.dataplane == DataplaneKind::None {
                        // Nothing to program: following the stream is the whole job.
                        health.applied(std::time::SystemTime::now());
                    }
                }
                _ = resync.tick() => force = true,
                Some(q) = queries.recv() => {
                    if q.what == "ebpf" {
                        let Some(cfg) = ebpf_report.clone() else {
                            let name = clap::ValueEnum::to_possible_value(&args.dataplane).map(|v| v.get_name().to_string()).unwrap_or_default();
                            let _ = q.reply.send(serde_json::json!({"error": format!("this node runs the {name} dataplane")}));
                            continue;
                        };
                        let (view, plan_cfg) = (view.clone(), plan_cfg.clone());
                        // Reading the maps takes a while with many Services: off this loop.
                        tokio::spawn(async move {
                            let answer = tokio::task::spawn_blocking(move || {
                                let plan = {
                                    let v = view.read().unwrap_or_else(|p| p.into_inner());
                                    weft_agent::dataplane::plan::build(&v, &plan_cfg)
                                };
                                weft_agent::dataplane::ebpf::report::answer(&cfg, &plan)
                            })
                            .await
                            .unwrap_or_else(|e| serde_json::json!({"error": format!("the eBPF report failed: {e}")}));
                            let _ = q.reply.send(answer);
                        });
                        continue;
                    }
                    let answer = match (q.what.as_str(), node.as_ref()) {
                        ("overlay", Some(n)) => n.describe(&view).await,
                        ("overlay", None) => serde_json::json!({"error": "this agent runs with --no-overlay"}),
                        ("services", _) | ("trace", _) => {
                            let v = view.read().unwrap_or_else(|p| p.into_inner());
                            let plan = weft_agent::dataplane::plan::build(&v, &plan_cfg);
                            if q.what == "services" {
                                let mut answer = weft_agent::dataplane::report::services(&v, &plan);
                                answer["dataplane"] = match args.dataplane {
                                    DataplaneKind::Iptables => format!("iptables ({})", mode.as_str()),
                                    DataplaneKind::Ebpf => format!("ebpf (socket programs; hostPorts with iptables {})", mode.as_str()),
                                    DataplaneKind::None => "none (Services are not programmed)".to_string(),
                                }
                                .into();
                                let hostports = weft_agent::dataplane::hostports::read(&args.ipam_dir);
                                answer["hostPorts"] = hostports
                                    .ports
                                    .iter()
                                    .map(|h| {
                                        let on = h.host_ip.map_or_else(|| "*".to_string(), |ip| ip.to_string());
                                        format!("{on}:{}/{} -> {}:{} ({})", h.host_port, h.protocol.as_str(), h.pod_ip, h.container_port, h.pod)
                                    })
                                    .chain(hostports.conflicts.iter().map(|c| format!("not programmed: {c}")))
                                    .collect::<Vec<_>>()
                                    .into();
                                answer
                            } else {
                                let hostports = weft_agent::dataplane::hostports::read(&args.ipam_dir);
                                weft_agent::dataplane::report::trace_request(&q.request, &plan, &plan_cfg, &hostports.ports)
                            }
                        }
                        (other, _) => serde_json::json!({"error": format!("unknown query {other:?}")}),
                    };
                    let _ = q.reply.send(answer);
                    continue;
                }
                _ = tokio::signal::ctrl_c() => break,
            }
            if let Some(n) = node.as_mut() {
                n.sync(&view, force).await;
            }
        }
        Ok(())
    })
}
