//! The iptables service dataplane: applies [`render`]ed rules with one
//! atomic `iptables-restore --noflush` that rewrites only the chains that
//! changed, hooks weft's chains into the built-in ones, follows the host's
//! iptables mode (nft or legacy, as kube-proxy's iptables wrapper does),
//! notices when someone else flushed or deleted our chains and restores them,
//! and deletes UDP conntrack entries that would keep clients on a removed
//! endpoint (or on "no endpoint").
//!
//! Only `WEFT-…` chains are ever created, flushed or deleted, and only our
//! own jump rules are inserted into the built-in chains. `WEFT-POSTROUTING`
//! (the overlay's pod masquerade, `node.rs`) is not this module's.

use super::iptables::{
    render, render_service, restore_input_partial, shared_chains, Ruleset, ServiceRules,
    BUCKET_PREFIX,
};
use super::plan::PlannedService;
use super::plan::{FrontendKind, ServicePlan, Target};
use super::{ApplyStats, ServiceDataplane};
use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use weft_model::view::Protocol;

/// Which of the kernel's two iptables implementations rules go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nft,
    Legacy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Nft => "nft",
            Mode::Legacy => "legacy",
        }
    }

    /// `iptables`, `iptables-save` or `iptables-restore` of this mode.
    pub fn tool(self, tool: &str) -> String {
        match tool.strip_prefix("iptables") {
            Some(rest) => format!("iptables-{}{rest}", self.as_str()),
            None => tool.to_string(),
        }
    }

    /// The mode the host already uses, decided as kube-proxy's iptables
    /// wrapper does: the implementation holding more rules wins (other
    /// components, e.g. the container runtime, put theirs there first); a tie
    /// (a fresh host) goes to nft, the default of current distributions.
    pub fn detect() -> Mode {
        let count = |mode: Mode| -> usize {
            Command::new(mode.tool("iptables-save"))
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| count_rules(&String::from_utf8_lossy(&o.stdout)))
                .unwrap_or(0)
        };
        choose_mode(count(Mode::Legacy), count(Mode::Nft))
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "nft" => Ok(Mode::Nft),
            "legacy" => Ok(Mode::Legacy),
            other => Err(format!("iptables mode {other:?}: expected nft or legacy")),
        }
    }
}

/// Rules (`-A` lines) in `iptables-save` output.
pub fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

pub fn choose_mode(legacy_rules: usize, nft_rules: usize) -> Mode {
    if legacy_rules > nft_rules {
        Mode::Legacy
    } else {
        Mode::Nft
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("conntrack {args}: {reason}")]
    Conntrack { args: String, reason: String },
    #[error("{tool} {args} failed: {stderr}")]
    Failed {
        tool: String,
        args: String,
        stderr: String,
    },
}

/// Runs the iptables tools of one mode.
#[derive(Clone, Debug)]
pub struct Iptables {
    pub mode: Mode,
}

impl Iptables {
    fn exec(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let tool = self.mode.tool(tool);
        let spawn = |source| Error::Spawn {
            tool: tool.clone(),
            source,
        };
        let mut child = Command::new(&tool)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn)?;
        // A tool that exits early (e.g. it could not take the xtables lock)
        // closes its input: its own message says why, not the broken pipe.
        let mut write_err = None;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            write_err = pipe.write_all(input.as_bytes()).err();
        }
        let out = child.wait_with_output().map_err(spawn)?;
        if let (Some(e), true) = (write_err, out.status.success()) {
            return Err(spawn(e));
        }
        if !out.status.success() {
            return Err(Error::Failed {
                tool,
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables ARGS` (waiting for the xtables lock rather than failing).
    pub fn run(&self, args: &[&str]) -> Result<String, Error> {
        let mut all = vec!["-w", "5"];
        all.extend_from_slice(args);
        self.exec("iptables", &all, None)
    }

    /// One atomic `iptables-restore --noflush` transaction.
    pub fn restore(&self, input: &str) -> Result<(), Error> {
        self.exec("iptables-restore", &["--noflush", "-w", "5"], Some(input))
            .map(|_| ())
    }

    pub fn save(&self, table: &str) -> Result<String, Error> {
        self.exec("iptables-save", &["-t", table], None)
    }

    /// The rules of one chain as `iptables -S` prints them (`-A CHAIN …`),
    /// `None` when the chain does not exist.
    pub fn chain_rules(&self, table: &str, chain: &str) -> Option<Vec<String>> {
        let out = self.run(&["-t", table, "-S", chain]).ok()?;
        Some(
            out.lines()
                .filter(|l| l.starts_with("-A "))
                .map(str::to_string)
                .collect(),
        )
    }
}

/// A jump from a built-in chain into ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    pub table: &'static str,
    pub chain: &'static str,
    /// The rule as `iptables -S` prints it, without `-A CHAIN `.
    pub rule: &'static str,
}

/// Our jumps, in the order they must appear at the top of each built-in
/// chain: Service portals before hostPorts (a hostPort never shadows a
/// Service), drops before the accepts of WEFT-FORWARD.
pub const HOOKS: &[Hook] = &[
    Hook {
        table: "nat",
        chain: "PREROUTING",
        rule: "-m comment --comment \"weft service portals\" -j WEFT-SERVICES",
    },
    Hook {
        table: "nat",
        chain: "PREROUTING",
        rule: "-m comment --comment \"weft hostports\" -j WEFT-HOSTPORTS",
    },
    Hook {
        table: "nat",
        chain: "OUTPUT",
        rule: "-m comment --comment \"weft service portals\" -j WEFT-SERVICES",
    },
    Hook {
        table: "nat",
        chain: "OUTPUT",
        rule: "-m comment --comment \"weft hostports\" -j WEFT-HOSTPORTS",
    },
    Hook {
        table: "nat",
        chain: "POSTROUTING",
        rule: "-m comment --comment \"weft service SNAT\" -j WEFT-SNAT",
    },
    Hook {
        table: "filter",
        chain: "INPUT",
        rule: "-m conntrack --ctstate NEW -m comment --comment \"weft service portals\" -j WEFT-SERVICES",
    },
    Hook {
        table: "filter",
        chain: "INPUT",
        rule: "-m comment --comment \"weft firewall\" -j WEFT-FIREWALL",
    },
    Hook {
        table: "filter",
        chain: "FORWARD",
        rule: "-m conntrack --ctstate NEW -m comment --comment \"weft service portals\" -j WEFT-SERVICES",
    },
    Hook {
        table: "filter",
        chain: "FORWARD",
        rule: "-m comment --comment \"weft firewall\" -j WEFT-FIREWALL",
    },
    Hook {
        table: "filter",
        chain: "FORWARD",
        rule: "-m comment --comment \"weft forwarding rules\" -j WEFT-FORWARD",
    },
    Hook {
        table: "filter",
        chain: "OUTPUT",
        rule: "-m conntrack --ctstate NEW -m comment --comment \"weft service portals\" -j WEFT-SERVICES",
    },
    Hook {
        table: "filter",
        chain: "OUTPUT",
        rule: "-m comment --comment \"weft firewall\" -j WEFT-FIREWALL",
    },
];

pub const CANARY: &str = "WEFT-CANARY";
const CANARY_RULE: &str =
    "-m comment --comment \"weft canary: empty means our chains were flushed\" -j RETURN";

/// Chains this module owns, besides those `render` produces: the canaries and
/// the hostPort chain the hooks jump to.
fn with_fixed_chains(mut rs: Ruleset, hostports: BTreeMap<String, Vec<String>>) -> Ruleset {
    for table in [&mut rs.nat, &mut rs.filter] {
        table.insert(CANARY.into(), vec![CANARY_RULE.into()]);
    }
    rs.nat.entry("WEFT-HOSTPORTS".into()).or_default();
    rs.nat.extend(hostports);
    rs
}

/// Whether a chain name is ours to manage here.
fn managed(chain: &str) -> bool {
    chain.starts_with("WEFT-") && chain != crate::node::MASQ_CHAIN
}

/// Which hooks are missing or out of order, per built-in chain, given that
/// chain's rules as `iptables -S` prints them.
pub fn hooks_ok(chain: &str, listed: &[String], want: &[&Hook]) -> bool {
    let ours: Vec<&str> = listed
        .iter()
        .filter_map(|l| l.strip_prefix(&format!("-A {chain} ")))
        .filter(|r| want.iter().any(|h| h.rule == *r))
        .collect();
    ours.len() == want.len() && ours.iter().zip(want).all(|(r, h)| *r == h.rule)
}

/// A UDP conntrack flush: entries that would keep sending a client's
/// packets to a removed endpoint, or nowhere.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flush {
    /// Every entry to this frontend (it just got its first endpoint: entries
    /// made while it had none were never translated).
    Frontend { ip: Option<IpAddr>, port: u16 },
    /// Entries to this frontend translated to a removed endpoint.
    Endpoint {
        ip: Option<IpAddr>,
        port: u16,
        target: IpAddr,
        target_port: u16,
    },
}

impl Flush {
    /// `conntrack` arguments. NodePorts match any local address (ip `None`).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["-D".to_string(), "-p".into(), "udp".into()];
        let (ip, port) = match self {
            Flush::Frontend { ip, port } | Flush::Endpoint { ip, port, .. } => (ip, port),
        };
        if let Some(ip) = ip {
            a.extend(["--orig-dst".into(), ip.to_string()]);
        }
        a.extend(["--orig-port-dst".into(), port.to_string()]);
        if let Flush::Endpoint {
            target,
            target_port,
            ..
        } = self
        {
            a.extend([
                "--reply-src".into(),
                target.to_string(),
                "--reply-port-src".into(),
                target_port.to_string(),
            ]);
        }
        a
    }
}

/// A UDP frontend as conntrack sees it (NodePorts: any local address).
type UdpFrontend = (Option<IpAddr>, u16);

/// The UDP frontends of a plan with every backend (address, port) they may use.
fn udp_frontends(plan: &ServicePlan) -> BTreeMap<UdpFrontend, BTreeSet<(IpAddr, u16)>> {
    let mut out: BTreeMap<_, BTreeSet<_>> = BTreeMap::new();
    for svc in &plan.services {
        for f in &svc.frontends {
            if f.protocol != Protocol::UDP {
                continue;
            }
            let key = match f.kind {
                FrontendKind::NodePort => (None, f.port),
                _ => (Some(f.ip), f.port),
            };
            let set = out.entry(key).or_default();
            if let Some(pb) = svc.backends.get(f.port_index) {
                let all = pb.cluster.iter().chain(&pb.internal).chain(&pb.external);
                set.extend(all.map(|t: &Target| (t.ip, t.port)));
            }
        }
    }
    out
}

/// What to delete from conntrack after moving from `old` to `new`
/// (kube-proxy's rules): a UDP frontend that goes from no endpoint to some
/// loses all its entries; an endpoint removed from a UDP frontend loses the
/// entries translated to it.
pub fn conntrack_flushes(old: &ServicePlan, new: &ServicePlan) -> Vec<Flush> {
    let before = udp_frontends(old);
    let after = udp_frontends(new);
    let empty = BTreeSet::new();
    let mut out = BTreeSet::new();
    for ((ip, port), now) in &after {
        let was = before.get(&(*ip, *port)).unwrap_or(&empty);
        if was.is_empty() && !now.is_empty() {
            out.insert(Flush::Frontend {
                ip: *ip,
                port: *port,
            });
            continue;
        }
        for (t, tp) in was.difference(now) {
            out.insert(Flush::Endpoint {
                ip: *ip,
                port: *port,
                target: *t,
                target_port: *tp,
            });
        }
    }
    for ((ip, port), was) in &before {
        if after.contains_key(&(*ip, *port)) {
            continue;
        }
        for (t, tp) in was {
            out.insert(Flush::Endpoint {
                ip: *ip,
                port: *port,
                target: *t,
                target_port: *tp,
            });
        }
    }
    out.into_iter().collect()
}

/// A planned Service as plans share it.
type Shared = Arc<PlannedService>;

/// The iptables dataplane. `apply` is synchronous (it runs the iptables
/// tools); the agent calls it off its async runtime.
pub struct IptablesDataplane {
    ipt: Iptables,
    cluster_cidr: String,
    /// What the kernel holds, as last applied; `None` = unknown (read it
    /// from the kernel on the next apply and rewrite everything).
    have: Option<Ruleset>,
    /// Per Service (`namespace/name`): the plan it was last rendered from and
    /// its rules. A Service whose plan is unchanged is neither rendered nor
    /// compared again.
    rendered: HashMap<String, (Shared, ServiceRules)>,
    /// Whether anything was applied yet (conntrack cleanup needs a before).
    applied_once: bool,
    /// Delete UDP conntrack entries (off where the conntrack tool is absent).
    pub conntrack: bool,
    /// NodePorts also answer on 127.0.0.1 (route_localnet on the VXLAN device too).
    pub localhost_node_ports: bool,
}

impl IptablesDataplane {
    pub fn new(mode: Mode, cluster_cidr: impl Into<String>) -> IptablesDataplane {
        IptablesDataplane {
            ipt: Iptables { mode },
            cluster_cidr: cluster_cidr.into(),
            have: None,
            rendered: HashMap::new(),
            applied_once: false,
            conntrack: true,
            localhost_node_ports: false,
        }
    }

    pub fn mode(&self) -> Mode {
        self.ipt.mode
    }

    /// The rules for `plan` (and hostPort chains), as they would be applied.
    pub fn desired(&self, plan: &ServicePlan, hostports: BTreeMap<String, Vec<String>>) -> Ruleset {
        with_fixed_chains(render(plan, &self.cluster_cidr), hostports)
    }

    /// Our chains as the kernel has them now (their names; contents unknown).
    fn existing(&self) -> Result<Ruleset, Error> {
        let mut rs = Ruleset::default();
        for (table, map) in [("nat", &mut rs.nat), ("filter", &mut rs.filter)] {
            for line in self.ipt.save(table)?.lines() {
                if let Some(name) = line.strip_prefix(':').and_then(|l| l.split(' ').next()) {
                    if managed(name) {
                        // A content that never matches: every wanted chain is rewritten.
                        map.insert(name.to_string(), vec!["(unknown)".into()]);
                    }
                }
            }
        }
        Ok(rs)
    }

    /// Make the kernel match `plan`: one restore of the changed chains, then
    /// the hooks (first sync and after damage), then conntrack cleanup. Only
    /// Services whose plan changed are rendered, compared and written, plus
    /// the shared chains (`WEFT-SERVICES` and the like) when they changed.
    pub fn apply(
        &mut self,
        plan: &ServicePlan,
        hostports: BTreeMap<String, Vec<String>>,
    ) -> Result<ApplyStats, Error> {
        let mut stats = ApplyStats {
            services: plan.services.len(),
            endpoints: plan
                .services
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| b.cluster.len()))
                .sum(),
            ..ApplyStats::default()
        };
        // What the kernel holds; unknown: read the chain names and rewrite all.
        let (mut have, previous) = match self.have.take() {
            Some(h) => (h, None),
            None => {
                stats.full = true;
                (self.existing()?, Some(std::mem::take(&mut self.rendered)))
            }
        };
        let mut want = Ruleset::default();
        let mut maybe_gone: BTreeSet<String> = BTreeSet::new();
        // (old, new) plans of the Services that changed, for conntrack.
        let mut moved: Vec<(Option<Shared>, Option<Shared>)> = Vec::new();
        let mut present = std::collections::HashSet::with_capacity(plan.services.len());
        for svc in &plan.services {
            let key = format!("{}/{}", svc.namespace, svc.name);
            let fresh = match self.rendered.get(&key) {
                Some((p, _)) => !Arc::ptr_eq(p, svc) && **p != **svc,
                None => true,
            };
            if fresh {
                let rules = render_service(svc, &self.cluster_cidr);
                want.nat.extend(rules.chains.iter().cloned());
                let before = match self.rendered.insert(key.clone(), (svc.clone(), rules)) {
                    Some((p, old)) => {
                        maybe_gone.extend(old.chains.into_iter().map(|(c, _)| c));
                        Some(p)
                    }
                    None => previous
                        .as_ref()
                        .and_then(|m| m.get(&key))
                        .map(|(p, _)| p.clone()),
                };
                if before.as_ref() != Some(svc) {
                    moved.push((before, Some(svc.clone())));
                }
            }
            present.insert(key);
        }
        // Services no longer planned.
        self.rendered.retain(|k, (p, r)| {
            let keep = present.contains(k);
            if !keep {
                maybe_gone.extend(r.chains.iter().map(|(c, _)| c.clone()));
                moved.push((Some(p.clone()), None));
            }
            keep
        });
        if let Some(previous) = &previous {
            for (k, (p, _)) in previous {
                if !present.contains(k) {
                    moved.push((Some(p.clone()), None));
                }
            }
        }
        let parts = plan.services.iter().filter_map(|s| {
            self.rendered
                .get(&format!("{}/{}", s.namespace, s.name))
                .map(|(_, r)| r)
        });
        shared_chains(parts, &self.cluster_cidr, &mut want);
        let want = with_fixed_chains(want, hostports);
        // hostPort chains come and go with the pods, frontend buckets with
        // the Services.
        maybe_gone.extend(
            have.nat
                .keys()
                .filter(|k| {
                    (k.starts_with("WEFT-HP-") || k.starts_with(BUCKET_PREFIX))
                        && !want.nat.contains_key(*k)
                })
                .cloned(),
        );
        let mut gone_filter = BTreeSet::new();
        if stats.full {
            // Everything of ours the kernel has that is not wanted goes.
            maybe_gone.extend(have.nat.keys().cloned());
            gone_filter.extend(have.filter.keys().cloned());
            // The jumps go in before the rules: while our chains are still
            // small (legacy iptables rewrites the whole table per insert),
            // creating the hooked chains first if they do not exist yet (an
            // existing chain keeps serving until the restore replaces it).
            if let Err(e) = self.hooks_first(&have) {
                self.rendered.clear();
                return Err(e);
            }
        }
        if let Some(input) = restore_input_partial(&have, &want, &maybe_gone, &gone_filter) {
            stats.chains = input.lines().filter(|l| l.starts_with(':')).count();
            stats.bytes = input.len();
            if let Err(e) = self.ipt.restore(&input) {
                // The kernel's state is unknown now: start over next time.
                self.rendered.clear();
                return Err(e);
            }
        }
        for (table, w, gone) in [
            (&mut have.nat, want.nat, &maybe_gone),
            (&mut have.filter, want.filter, &gone_filter),
        ] {
            for g in gone {
                table.remove(g);
            }
            table.extend(w);
        }
        self.have = Some(have);
        if self.conntrack && self.applied_once && !moved.is_empty() {
            let (mut old, mut new) = (ServicePlan::default(), ServicePlan::default());
            for (o, n) in moved {
                old.services.extend(o);
                new.services.extend(n);
            }
            for f in conntrack_flushes(&old, &new) {
                match delete_conntrack(&f) {
                    Ok(n) => stats.conntrack_deleted += n,
                    Err(e) => stats.conntrack_errors.push(e),
                }
            }
        }
        self.applied_once = true;
        Ok(stats)
    }

    /// Create the chains the hooks jump to that `have` lacks, then put the hooks in.
    fn hooks_first(&self, have: &Ruleset) -> Result<(), Error> {
        let mut input = String::new();
        for (table, chains) in [("nat", &have.nat), ("filter", &have.filter)] {
            let missing: BTreeSet<&str> = HOOKS
                .iter()
                .filter(|h| h.table == table)
                .filter_map(|h| h.rule.rsplit(' ').next())
                .filter(|c| !chains.contains_key(*c))
                .collect();
            if !missing.is_empty() {
                input.push_str(&format!("*{table}\n"));
                for c in missing {
                    input.push_str(&format!(":{c} - [0:0]\n"));
                }
                input.push_str("COMMIT\n");
            }
        }
        if !input.is_empty() {
            self.ipt.restore(&input)?;
        }
        self.ensure_hooks()
    }

    /// Put our jumps at the top of the built-in chains, in order.
    pub fn ensure_hooks(&self) -> Result<(), Error> {
        let mut by_chain: BTreeMap<(&str, &str), Vec<&Hook>> = BTreeMap::new();
        for h in HOOKS {
            by_chain.entry((h.table, h.chain)).or_default().push(h);
        }
        for ((table, chain), hooks) in by_chain {
            let listed = self.ipt.chain_rules(table, chain).unwrap_or_default();
            if hooks_ok(chain, &listed, &hooks) {
                continue;
            }
            for h in &hooks {
                let words = split_rule(h.rule);
                let mut args = vec!["-t", h.table, "-D", h.chain];
                args.extend(words.iter().map(String::as_str));
                // Remove every copy (a rule may have been duplicated or moved).
                while self.ipt.run(&args).is_ok() {}
            }
            for (i, h) in hooks.iter().enumerate() {
                let pos = (i + 1).to_string();
                let mut args = vec!["-t", h.table, "-I", h.chain, pos.as_str()];
                let words = split_rule(h.rule);
                args.extend(words.iter().map(String::as_str));
                self.ipt.run(&args)?;
            }
        }
        Ok(())
    }
}

impl ServiceDataplane for IptablesDataplane {
    type Error = Error;

    fn name(&self) -> &'static str {
        "iptables"
    }

    fn program(
        &mut self,
        plan: &ServicePlan,
        hostports: &[super::hostports::HostPort],
    ) -> Result<ApplyStats, Error> {
        // Local pods (hostPorts; NodePorts when enabled on localhost) are
        // reached over the bridge, remote ones over VXLAN (localhost
        // NodePorts only); WEFT-FIREWALL guards 127/8 from neighbours.
        let mut devices = vec![crate::overlay::BRIDGE];
        if self.localhost_node_ports {
            devices.push(crate::overlay::VXLAN);
        }
        for dev in devices {
            if let Err(e) = ensure_route_localnet(dev) {
                tracing::warn!(error = %e, "route_localnet not set");
            }
        }
        self.apply(plan, super::hostports::render(hostports))
    }

    /// Whether our rules are still in the kernel as we left them: the
    /// canaries hold their rule (a flush of a table empties them; a firewall
    /// reload deletes them) and the hooks are in place. When not, the next
    /// apply rewrites everything. Returns the reason, if damaged.
    fn check(&mut self) -> Option<String> {
        self.have.as_ref()?;
        let mut damage = None;
        for table in ["nat", "filter"] {
            match self.ipt.chain_rules(table, CANARY) {
                None => damage = Some(format!("{table} {CANARY} is gone")),
                Some(r) if r.len() != 1 => damage = Some(format!("{table} {CANARY} was flushed")),
                _ => {}
            }
        }
        if damage.is_none() {
            let mut by_chain: BTreeMap<(&str, &str), Vec<&Hook>> = BTreeMap::new();
            for h in HOOKS {
                by_chain.entry((h.table, h.chain)).or_default().push(h);
            }
            for ((table, chain), hooks) in by_chain {
                let listed = self.ipt.chain_rules(table, chain).unwrap_or_default();
                if !hooks_ok(chain, &listed, &hooks) {
                    damage = Some(format!("jumps from {table} {chain} are missing"));
                }
            }
        }
        if damage.is_some() {
            self.have = None;
        }
        damage
    }

    /// Forget what was applied: the next apply reads the kernel and rewrites
    /// every chain (the periodic full resync).
    fn invalidate(&mut self) {
        self.have = None;
    }
}

/// Let packets from 127.0.0.0/8 leave through weft's bridge once DNATed to a
/// pod (localhost hostPorts and NodePorts), on that device only — never
/// `all` (CVE-2020-8558; WEFT-FIREWALL drops martian traffic to 127/8).
pub fn ensure_route_localnet(device: &str) -> Result<(), String> {
    let path = format!("/proc/sys/net/ipv4/conf/{device}/route_localnet");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => std::fs::write(&path, "1").map_err(|e| format!("writing {path}: {e}")),
        // The bridge appears when the overlay is up; nothing to do before.
        Err(_) => Ok(()),
    }
}

/// Split a rule into words, keeping quoted comments whole.
pub fn split_rule(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in rule.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Run one conntrack deletion; the number of entries deleted.
fn delete_conntrack(f: &Flush) -> Result<u64, Error> {
    let args = f.args();
    let failed = |reason: String| Error::Conntrack {
        args: args.join(" "),
        reason,
    };
    let out = Command::new("conntrack")
        .args(&args)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    // conntrack exits 1 when nothing matched; its count is on stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    deleted_count(&text).ok_or_else(|| failed(text.trim().to_string()))
}

/// `conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.` → 2
fn deleted_count(stderr: &str) -> Option<u64> {
    let before = stderr.split(" flow entries have been deleted").next()?;
    if before.len() == stderr.len() {
        return None;
    }
    before.rsplit(' ').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, node_port_service};
    use super::*;
    use weft_model::view::{FrontendPort, Protocol};
    use weft_model::{Backend, BackendPort, ServiceEntry};

    fn udp_backend(ip: &str) -> Backend {
        Backend {
            ports: vec![BackendPort {
                name: "dns".into(),
                protocol: Protocol::UDP,
                port: 5353,
            }],
            ..fixtures::backend(ip, "node-1", true, true, false)
        }
    }

    fn udp_service(backends: Vec<Backend>) -> ServiceEntry {
        ServiceEntry {
            ports: vec![FrontendPort {
                name: "dns".into(),
                protocol: Protocol::UDP,
                port: 53,
                node_port: Some(30053),
            }],
            ..node_port_service("dns", backends)
        }
    }

    #[test]
    fn mode_follows_the_host() {
        assert_eq!(choose_mode(0, 0), Mode::Nft);
        assert_eq!(choose_mode(12, 3), Mode::Legacy);
        assert_eq!(choose_mode(3, 3), Mode::Nft);
        assert_eq!(
            Mode::Legacy.tool("iptables-restore"),
            "iptables-legacy-restore"
        );
        assert_eq!(Mode::Nft.tool("iptables"), "iptables-nft");
        assert!("bogus".parse::<Mode>().unwrap_err().contains("bogus"));
        assert_eq!(
            count_rules("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j X\nCOMMIT\n"),
            1
        );
    }

    #[test]
    fn udp_conntrack_flushes() {
        let none = fixtures::plan(vec![udp_service(vec![])]);
        let one = fixtures::plan(vec![udp_service(vec![udp_backend("198.18.128.5")])]);
        let other = fixtures::plan(vec![udp_service(vec![udp_backend("198.18.128.6")])]);
        // 0 -> 1: everything to the frontends goes (cluster IP and the NodePort on any address)
        let f = conntrack_flushes(&none, &one);
        assert_eq!(
            f,
            vec![
                Flush::Frontend {
                    ip: None,
                    port: 30053
                },
                Flush::Frontend {
                    ip: Some(fixtures::CLUSTER_IP.parse().unwrap()),
                    port: 53
                },
            ]
        );
        assert_eq!(
            f[1].args().join(" "),
            "-D -p udp --orig-dst 198.19.0.20 --orig-port-dst 53"
        );
        // an endpoint replaced: entries to the old one go, per frontend
        let f = conntrack_flushes(&one, &other);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().all(
            |x| matches!(x, Flush::Endpoint { target, .. } if target.to_string() == "198.18.128.5")
        ));
        assert_eq!(
            f[0].args().join(" "),
            "-D -p udp --orig-port-dst 30053 --reply-src 198.18.128.5 --reply-port-src 5353"
        );
        // nothing changed, or TCP only: nothing to flush
        assert!(conntrack_flushes(&one, &one).is_empty());
        let tcp = fixtures::plan(vec![node_port_service(
            "web",
            vec![fixtures::backend(
                "198.18.128.5",
                "node-1",
                true,
                true,
                false,
            )],
        )]);
        assert!(conntrack_flushes(&ServicePlan::default(), &tcp).is_empty());
        // a Service deleted: entries to its endpoints go
        let f = conntrack_flushes(&one, &ServicePlan::default());
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn conntrack_counts() {
        let line = "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n";
        assert_eq!(deleted_count(line), Some(2));
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
            ),
            Some(0)
        );
        assert_eq!(deleted_count("conntrack: unknown option"), None);
    }

    #[test]
    fn hooks_in_order() {
        let pre: Vec<&Hook> = HOOKS.iter().filter(|h| h.chain == "PREROUTING").collect();
        let line = |h: &Hook| format!("-A PREROUTING {}", h.rule);
        let good = vec![line(pre[0]), line(pre[1]), "-A PREROUTING -j DOCKER".into()];
        assert!(hooks_ok("PREROUTING", &good, &pre));
        let swapped = vec![line(pre[1]), line(pre[0])];
        assert!(!hooks_ok("PREROUTING", &swapped, &pre));
        assert!(!hooks_ok("PREROUTING", &good[..1], &pre));
        assert_eq!(
            split_rule("-m comment --comment \"weft hostports\" -j WEFT-HOSTPORTS"),
            vec![
                "-m",
                "comment",
                "--comment",
                "weft hostports",
                "-j",
                "WEFT-HOSTPORTS"
            ]
        );
    }

    #[test]
    fn fixed_chains_and_ownership() {
        let dp = IptablesDataplane::new(Mode::Nft, fixtures::CLUSTER_CIDR);
        let rs = dp.desired(&ServicePlan::default(), BTreeMap::new());
        for h in HOOKS {
            let target = h.rule.rsplit(' ').next().unwrap();
            let table = if h.table == "nat" {
                &rs.nat
            } else {
                &rs.filter
            };
            assert!(
                table.contains_key(target),
                "{target} is hooked but not rendered"
            );
        }
        assert!(
            managed("WEFT-SVC-0123") && !managed("WEFT-POSTROUTING") && !managed("KUBE-SERVICES")
        );
    }
}
