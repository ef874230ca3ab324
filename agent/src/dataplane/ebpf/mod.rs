//! The eBPF service dataplane. Services are load-balanced at the socket:
//! cgroup/connect4 and sendmsg4 programs translate a Service frontend to a
//! backend when a pod or host process connects or sends, getpeername4 and
//! recvmsg4 show the frontend back, so established flows carry no
//! per-packet NAT.
//!
//! The pieces: [`encode`] (pure: planned Service -> frontend entries,
//! checked against the tracer), [`reconcile`] (writes only what changed,
//! adopts the pinned maps on restart), [`kernel`] (load, pin, attach,
//! atomic program replacement), and [`EbpfDataplane`], which ties them to
//! the [`ServiceDataplane`] seam. hostPorts stay with iptables chains
//! ([`IptablesDataplane`] programmed with an empty Service plan).

pub mod encode;
pub mod kernel;
pub mod object;
pub mod reconcile;
pub mod report;

use super::hostports::HostPort;
use super::netfilter::{self, IptablesDataplane};
use super::plan::ServicePlan;
use super::{ApplyStats, ServiceDataplane};
use std::path::PathBuf;

/// Where a node's programs attach and its maps are pinned.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// cgroup v2 directory whose processes (and descendants) get the socket
    /// programs: the cgroup v2 root on a real node, one directory per
    /// simulated node in tests.
    pub cgroup: PathBuf,
    /// bpffs directory for pinned maps and links (mounted if it is not on
    /// a bpf filesystem).
    pub bpffs: PathBuf,
    /// Where north-south traffic is translated (None: socket programs only).
    pub tc: Option<kernel::TcInterfaces>,
    /// The CNI plugin's IPAM claims: the local pods' network namespaces,
    /// where connected UDP sockets to a removed backend are destroyed.
    pub ipam_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Reconcile(#[from] reconcile::ReconcileError<kernel::KernelError>),
    #[error("hostPort chains")]
    HostPorts(#[source] netfilter::Error),
}

/// The eBPF implementation of [`ServiceDataplane`].
pub struct EbpfDataplane {
    cfg: EbpfConfig,
    kernel: Option<kernel::Kernel>,
    reconciler: Option<reconcile::Reconciler>,
    hostports: IptablesDataplane,
}

impl EbpfDataplane {
    /// `hostports` programs the CNI portMappings (and nothing else).
    pub fn new(cfg: EbpfConfig, hostports: IptablesDataplane) -> EbpfDataplane {
        EbpfDataplane {
            cfg,
            kernel: None,
            reconciler: None,
            hostports,
        }
    }

    fn kernel(&mut self) -> Result<&mut kernel::Kernel, EbpfError> {
        if self.kernel.is_none() {
            let k = kernel::Kernel::open(&self.cfg.bpffs, &self.cfg.cgroup)?;
            tracing::info!(
                cgroup = %self.cfg.cgroup.display(),
                bpffs = %self.cfg.bpffs.display(),
                attached = ?k.attach.attached,
                replaced = ?k.attach.replaced,
                "eBPF socket programs in place"
            );
            self.kernel = Some(k);
        }
        Ok(self.kernel.as_mut().expect("set above"))
    }
}

impl EbpfDataplane {
    /// Backends no Service uses any more: destroy the connected UDP sockets
    /// still aimed at them (this node's processes and every local pod), so
    /// the next connect() picks a live backend, and drop their north-south
    /// connection entries. Returns how many entries and sockets went;
    /// failures are logged (the next removal tries again).
    fn forget_backends(&mut self, removed: &[(u32, u16)]) -> u64 {
        if removed.is_empty() {
            return 0;
        }
        let targets: Vec<(std::net::Ipv4Addr, u16)> = removed
            .iter()
            .map(|(a, p)| (encode::addr_of(*a), u16::from_be(*p)))
            .collect();
        let mut n = 0u64;
        let mut errors = Vec::new();
        if let Some(k) = self.kernel.as_mut() {
            match k.purge_connections(removed) {
                Ok(c) => n += c as u64,
                Err(e) => errors.push(format!("connection map: {e}")),
            }
        }
        // This thread runs in the node's network namespace (the driver
        // calls program() on a blocking thread of the agent).
        match super::sockdestroy::destroy_udp_to(&targets) {
            Ok(c) => n += c as u64,
            Err(e) => errors.push(format!("node sockets: {e}")),
        }
        let netns: Vec<PathBuf> = self
            .cfg
            .ipam_dir
            .as_deref()
            .map(pod_netns)
            .unwrap_or_default();
        for ns in netns {
            match super::sockdestroy::destroy_udp_to_in(&ns, &targets) {
                Ok(c) => n += c as u64,
                // A pod being torn down: its namespace may be gone already.
                Err(e) if !ns.exists() => tracing::debug!(netns = %ns.display(), %e, "pod gone"),
                Err(e) => errors.push(format!("{}: {e}", ns.display())),
            }
        }
        for e in &errors {
            tracing::warn!(error = %e, "cleaning up after removed backends");
        }
        if n > 0 {
            tracing::info!(backends = ?targets, removed = n, "stale UDP sockets and connections removed");
        }
        n
    }
}

/// The plan cut down to the frontends whose port has no usable endpoint
/// anywhere (the tracer's REJECT): what the iptables filter rules refuse.
fn rejecting(plan: &ServicePlan) -> ServicePlan {
    let services = plan
        .services
        .iter()
        .filter_map(|s| {
            let frontends: Vec<_> = s
                .frontends
                .iter()
                .filter(|f| {
                    s.backends
                        .get(f.port_index)
                        .is_some_and(|b| b.cluster.is_empty())
                })
                .cloned()
                .collect();
            (!frontends.is_empty()).then(|| {
                std::sync::Arc::new(super::plan::PlannedService {
                    frontends,
                    ..(**s).clone()
                })
            })
        })
        .collect();
    ServicePlan {
        services,
        ..Default::default()
    }
}

/// Network namespaces of the pods in the IPAM claims.
fn pod_netns(ipam_dir: &std::path::Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(ipam_dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .parse::<std::net::Ipv4Addr>()
                .is_ok()
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| weft_model::node_state::Claim::decode(&t))
        .filter_map(|c| c.netns.map(PathBuf::from))
        .collect();
    out.sort();
    out.dedup();
    out
}

impl ServiceDataplane for EbpfDataplane {
    type Error = EbpfError;

    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn program(
        &mut self,
        plan: &ServicePlan,
        hostports: &[HostPort],
    ) -> Result<ApplyStats, EbpfError> {
        let full = self.reconciler.is_none();
        let kernel = self.kernel()?;
        if full {
            use reconcile::MapStore;
            let image = kernel.image()?;
            tracing::info!(
                frontends = image.services.len(),
                backends = image.backends.len(),
                "adopting the pinned service maps"
            );
            self.reconciler = Some(reconcile::Reconciler::adopt(&image));
        }
        let kernel = self.kernel.as_mut().expect("opened above");
        if let Some(tc) = &self.cfg.tc {
            let attached = kernel.ensure_tc(tc)?;
            if !attached.is_empty() {
                tracing::info!(interfaces = ?attached, "TC program attached");
            }
        }
        let reconciler = self.reconciler.as_mut().expect("set above");
        let result = reconciler.apply(plan, kernel);
        let stats = match result {
            Ok(s) => s,
            Err(e) => {
                // What was written is unknown: adopt the maps again next time.
                self.reconciler = None;
                return Err(e.into());
            }
        };
        let destroyed = self.forget_backends(&stats.removed_backends);
        for (key, a, b) in &stats.conflicts {
            tracing::warn!(frontend = ?key, kept = %a, ignored = %b, "two Services want one frontend");
        }
        for (svc, lb) in &stats.unknown_lb {
            tracing::warn!(service = %svc, value = %lb, option = encode::LB_OPTION, "unknown load-balancing algorithm; using random");
        }
        // iptables keeps the hostPorts, and refuses packets for frontends
        // without endpoints that reach the stack: the TC program passes them
        // on, and only a filter REJECT answers a reset or port unreachable
        // for an address that is not the node's own (a load-balancer IP).
        let hp = self
            .hostports
            .program(&rejecting(plan), hostports)
            .map_err(EbpfError::HostPorts)?;
        Ok(ApplyStats {
            chains: stats.writes + hp.chains,
            bytes: hp.bytes,
            full: full || hp.full,
            conntrack_deleted: hp.conntrack_deleted + destroyed,
            conntrack_errors: hp.conntrack_errors,
            services: plan.services.len(),
            endpoints: plan
                .services
                .iter()
                .map(|s| s.backends.iter().map(|b| b.cluster.len()).sum::<usize>())
                .sum(),
        })
    }

    fn check(&mut self) -> Option<String> {
        if let Some(k) = &self.kernel {
            let missing = k.links_missing();
            if !missing.is_empty() {
                self.invalidate();
                return Some(format!("pinned links gone: {}", missing.join(", ")));
            }
        }
        self.hostports.check()
    }

    fn invalidate(&mut self) {
        self.kernel = None;
        self.reconciler = None;
        self.hostports.invalidate();
    }
}
