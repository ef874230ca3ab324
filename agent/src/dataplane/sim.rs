//! A pure interpreter of rendered iptables rulesets, for property tests against the tracer.
//!
//! It parses the rule strings [`render`](super::iptables::render) emits (and
//! nothing else: an unknown option, match, target or chain is an error, so a
//! new rule shape is never silently skipped) and follows the first packet of
//! a NEW connection through netfilter as the kernel would: a packet from a
//! local process through nat OUTPUT, filter OUTPUT and nat POSTROUTING; a
//! packet arriving at the node through nat PREROUTING, then (routed after
//! DNAT) filter INPUT for a local destination, or filter FORWARD and nat
//! POSTROUTING. Random load balancing and `recent` affinity checks are
//! explored both ways, so the answer is every outcome the rules allow.

use super::iptables::Ruleset;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use weft_model::view::Protocol;

/// Chains nest at most this deep (a loop in the ruleset would recurse forever).
const MAX_DEPTH: usize = 32;

/// The rules of the built-in chains that lead into weft's chains. A ruleset
/// that holds a built-in chain itself (e.g. `nat` `PREROUTING`) overrides it.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    pub nat_prerouting: Vec<String>,
    pub nat_output: Vec<String>,
    pub nat_postrouting: Vec<String>,
    pub filter_input: Vec<String>,
    pub filter_forward: Vec<String>,
    pub filter_output: Vec<String>,
}

impl Hooks {
    /// kube-proxy's layout with weft's names. `WEFT-POSTROUTING` (the
    /// overlay's pod masquerade) is left out: it is not Service traffic.
    pub fn weft_default() -> Hooks {
        let new = |chain: &str| format!("-m conntrack --ctstate NEW -j {chain}");
        Hooks {
            nat_prerouting: vec!["-j WEFT-SERVICES".into()],
            nat_output: vec!["-j WEFT-SERVICES".into()],
            nat_postrouting: vec!["-j WEFT-SNAT".into()],
            filter_input: vec![
                new("WEFT-EXTERNAL"),
                new("WEFT-SERVICES"),
                "-j WEFT-FIREWALL".into(),
            ],
            filter_forward: vec![
                new("WEFT-EXTERNAL"),
                new("WEFT-SERVICES"),
                "-j WEFT-FIREWALL".into(),
                // Last: it only accepts, and must not let marked packets skip the firewall.
                "-j WEFT-FORWARD".into(),
            ],
            filter_output: vec![new("WEFT-SERVICES"), "-j WEFT-FIREWALL".into()],
        }
    }

    /// The jumps the iptables dataplane installs ([`netfilter::HOOKS`](super::netfilter::HOOKS)).
    pub fn installed() -> Result<Hooks, SimError> {
        let mut hooks = Hooks::default();
        for h in super::netfilter::HOOKS {
            let rules = match (h.table, h.chain) {
                ("nat", "PREROUTING") => &mut hooks.nat_prerouting,
                ("nat", "OUTPUT") => &mut hooks.nat_output,
                ("nat", "POSTROUTING") => &mut hooks.nat_postrouting,
                ("filter", "INPUT") => &mut hooks.filter_input,
                ("filter", "FORWARD") => &mut hooks.filter_forward,
                ("filter", "OUTPUT") => &mut hooks.filter_output,
                (table, chain) => {
                    return Err(SimError::UnknownHook {
                        table: table.into(),
                        chain: chain.into(),
                    })
                }
            };
            rules.push(h.rule.to_string());
        }
        Ok(hooks)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Nat,
    Filter,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    fn chain(self) -> &'static str {
        match self {
            Hook::Prerouting => "PREROUTING",
            Hook::Input => "INPUT",
            Hook::Forward => "FORWARD",
            Hook::Output => "OUTPUT",
            Hook::Postrouting => "POSTROUTING",
        }
    }
}

/// Where the packet enters the node's netfilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Sent by a process in the node's own network namespace.
    Node,
    /// Arriving on an interface: from a pod, over the overlay or from outside.
    Arriving,
}

/// The first packet of a NEW connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimPacket {
    pub origin: Origin,
    pub src: IpAddr,
    pub protocol: Protocol,
    pub dst: IpAddr,
    pub port: u16,
    /// An arriving packet's interface routes 127.0.0.0/8 (`route_localnet`,
    /// which weft sets on its bridge); elsewhere such a packet is a martian.
    pub route_localnet: bool,
}

/// What becomes of one packet along one path through the rules.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Dnat {
        ip: IpAddr,
        port: u16,
        masquerade: bool,
    },
    Reject,
    Drop,
    Pass {
        masquerade: bool,
    },
}

/// One path through the rules.
#[derive(Clone, Debug)]
pub struct Branch {
    pub outcome: Outcome,
    /// Its probability for a client without affinity (product of the
    /// `statistic` branches taken); meaningless when `sticky` is set.
    pub probability: f64,
    /// The `recent` list whose `--rcheck` matched (a returning client).
    pub sticky: Option<String>,
    /// `recent` lists the source was added to (`--set`).
    pub recent_set: Vec<String>,
    /// The `--seconds` of every `--rcheck` evaluated.
    pub affinity: BTreeSet<u32>,
    /// Every rule that matched, as `table CHAIN#index: rule`.
    pub trail: Vec<String>,
}

/// Every path the first packet may take.
#[derive(Clone, Debug)]
pub struct Simulation {
    pub branches: Vec<Branch>,
}

impl Simulation {
    pub fn outcomes(&self) -> BTreeSet<Outcome> {
        self.branches.iter().map(|b| b.outcome.clone()).collect()
    }

    /// Affinity timeouts in play on any path.
    pub fn affinity(&self) -> BTreeSet<u32> {
        self.branches
            .iter()
            .flat_map(|b| b.affinity.iter().copied())
            .collect()
    }

    /// How likely each outcome is for a client without affinity.
    pub fn fresh(&self) -> BTreeMap<Outcome, f64> {
        let mut out = BTreeMap::new();
        for b in self.branches.iter().filter(|b| b.sticky.is_none()) {
            *out.entry(b.outcome.clone()).or_insert(0.0) += b.probability;
        }
        out
    }

    /// Every rule that matched on any path, one path per line.
    pub fn trails(&self) -> String {
        let mut s = String::new();
        for b in &self.branches {
            s.push_str(&format!(
                "  {:?} p={:.4} sticky={:?}\n",
                b.outcome, b.probability, b.sticky
            ));
            for t in &b.trail {
                s.push_str(&format!("    {t}\n"));
            }
        }
        s
    }
}

/// Why a rule could not be understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("unterminated or misplaced quote")]
    Quote,
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("option {option}: cannot read {value:?}")]
    BadValue { option: String, value: String },
    #[error("unknown option {0}")]
    UnknownOption(String),
    #[error("unknown match module {0}")]
    UnknownModule(String),
    #[error("{0} cannot be negated here")]
    Negation(String),
    #[error("-m {0} needs -p {0} before it")]
    ProtocolModule(String),
    #[error("match module {module} is incomplete: {missing}")]
    Incomplete {
        module: &'static str,
        missing: &'static str,
    },
    #[error("no -j target")]
    NoTarget,
    #[error("target {target} does not take {option}")]
    TargetOption { target: String, option: String },
    #[error("target {target} is not valid in the {table} table")]
    TargetTable { target: String, table: Table },
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{table} {chain} rule {index} `{rule}`: {problem}")]
    Parse {
        table: Table,
        chain: String,
        index: usize,
        rule: String,
        #[source]
        problem: Problem,
    },
    #[error("{table} {chain}: jump to undefined chain {target}")]
    UnknownChain {
        table: Table,
        chain: String,
        target: String,
    },
    #[error("{table} {chain} `{rule}`: reached from {hook:?}, where its target is invalid")]
    WrongHook {
        table: Table,
        chain: String,
        rule: String,
        hook: Hook,
    },
    #[error("a hook in {table} {chain}, which no modelled packet path crosses")]
    UnknownHook { table: String, chain: String },
    #[error("chains nest deeper than {MAX_DEPTH} at {chain} (a loop?)")]
    TooDeep { chain: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CtState {
    New,
    Established,
    Related,
    Invalid,
    Untracked,
    Dnat,
    Snat,
}

#[derive(Clone, Debug)]
enum Match {
    Source {
        net: IpNetwork,
        negated: bool,
    },
    Destination {
        net: IpNetwork,
        negated: bool,
    },
    Protocol {
        protocol: Protocol,
        negated: bool,
    },
    DestinationPort {
        port: u16,
        negated: bool,
    },
    /// `--src-type LOCAL` (`source`) or `--dst-type LOCAL`.
    LocalAddress {
        source: bool,
        negated: bool,
    },
    Statistic {
        probability: f64,
    },
    RecentCheck {
        name: String,
        seconds: u32,
    },
    RecentSet {
        name: String,
    },
    Mark {
        value: u32,
        mask: u32,
        negated: bool,
    },
    CtState {
        states: Vec<CtState>,
        negated: bool,
    },
}

#[derive(Clone, Copy, Debug)]
enum MarkOp {
    Or(u32),
    Xor(u32),
    And(u32),
    /// `--set-xmark value/mask`: zero the mask's bits, then XOR the value.
    SetX {
        value: u32,
        mask: u32,
    },
    /// `--set-mark value/mask`: zero the mask's bits, then OR the value.
    Set {
        value: u32,
        mask: u32,
    },
}

impl MarkOp {
    fn apply(self, mark: u32) -> u32 {
        match self {
            MarkOp::Or(v) => mark | v,
            MarkOp::Xor(v) => mark ^ v,
            MarkOp::And(v) => mark & v,
            MarkOp::SetX { value, mask } => (mark & !mask) ^ value,
            MarkOp::Set { value, mask } => (mark & !mask) | value,
        }
    }
}

#[derive(Clone, Debug)]
enum Action {
    Jump(String),
    Return,
    Accept,
    Drop,
    Reject,
    Mark(MarkOp),
    Dnat { ip: IpAddr, port: Option<u16> },
    Masquerade,
}

#[derive(Clone, Debug)]
struct Rule {
    text: String,
    matches: Vec<Match>,
    action: Action,
}

/// Split a rule into words; `"…"` is one word (comments hold spaces).
fn words(rule: &str) -> Result<Vec<String>, Problem> {
    let mut out = Vec::new();
    let mut chars = rule.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(first) = chars.next() else {
            return Ok(out);
        };
        let mut word = String::new();
        if first == '"' {
            loop {
                match chars.next() {
                    None => return Err(Problem::Quote),
                    Some('"') => break,
                    Some('\\') => word.push(chars.next().ok_or(Problem::Quote)?),
                    Some(c) => word.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(Problem::Quote);
            }
        } else {
            word.push(first);
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '"' {
                    return Err(Problem::Quote);
                }
                word.push(c);
            }
        }
        out.push(word);
    }
}

fn bad(option: &str, value: &str) -> Problem {
    Problem::BadValue {
        option: option.into(),
        value: value.into(),
    }
}

fn number(option: &str, value: &str) -> Result<u32, Problem> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| bad(option, value))
}

/// `value[/mask]`; a missing mask is all ones.
fn value_mask(option: &str, value: &str) -> Result<(u32, u32), Problem> {
    match value.split_once('/') {
        Some((v, m)) => Ok((number(option, v)?, number(option, m)?)),
        None => Ok((number(option, value)?, u32::MAX)),
    }
}

fn network(option: &str, value: &str) -> Result<IpNetwork, Problem> {
    value.parse().map_err(|_| bad(option, value))
}

fn protocol(option: &str, value: &str) -> Result<Protocol, Problem> {
    match value {
        "tcp" => Ok(Protocol::TCP),
        "udp" => Ok(Protocol::UDP),
        "sctp" => Ok(Protocol::SCTP),
        _ => Err(bad(option, value)),
    }
}

/// The match module options currently apply to, and what it has gathered.
enum Module {
    None,
    Port,
    AddrType,
    Comment,
    Statistic {
        random: bool,
        probability: Option<f64>,
    },
    Recent {
        name: Option<String>,
        check: bool,
        set: bool,
        seconds: Option<u32>,
        reap: bool,
    },
    Mark,
    Conntrack,
}

impl Module {
    /// The match a module that gathers several options stands for, once complete.
    fn finish(self, matches: &mut Vec<Match>) -> Result<(), Problem> {
        match self {
            Module::Statistic {
                random,
                probability,
            } => {
                let missing = |what| Problem::Incomplete {
                    module: "statistic",
                    missing: what,
                };
                if !random {
                    return Err(missing("--mode random"));
                }
                let probability = probability.ok_or(missing("--probability"))?;
                matches.push(Match::Statistic { probability });
            }
            Module::Recent {
                name,
                check,
                set,
                seconds,
                reap,
            } => {
                let missing = |what| Problem::Incomplete {
                    module: "recent",
                    missing: what,
                };
                // The default list name would make unrelated Services share one list.
                let name = name.ok_or(missing("--name"))?;
                match (check, set) {
                    (true, false) => matches.push(Match::RecentCheck {
                        name,
                        seconds: seconds.ok_or(missing("--seconds with --rcheck"))?,
                    }),
                    (false, true) if seconds.is_none() && !reap => {
                        matches.push(Match::RecentSet { name })
                    }
                    (false, true) => return Err(missing("--set without --seconds/--reap")),
                    _ => return Err(missing("exactly one of --rcheck and --set")),
                }
                if reap && seconds.is_none() {
                    return Err(missing("--seconds with --reap"));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn parse_rule(text: &str, table: Table) -> Result<Rule, Problem> {
    let words = words(text)?;
    let mut matches = Vec::new();
    let mut module = Module::None;
    let mut proto: Option<Protocol> = None;
    let mut negated = false;
    let mut i = 0;
    while i < words.len() {
        let option = words[i].as_str();
        i += 1;
        if option == "!" {
            if negated {
                return Err(Problem::Negation("!".into()));
            }
            negated = true;
            continue;
        }
        let not = std::mem::take(&mut negated);
        if option == "-j" || option == "--jump" {
            if not {
                return Err(Problem::Negation(option.into()));
            }
            module.finish(&mut matches)?;
            let target = words
                .get(i)
                .ok_or_else(|| Problem::MissingValue(option.into()))?;
            let action = parse_target(target, &words[i + 1..], table)?;
            return Ok(Rule {
                text: text.into(),
                matches,
                action,
            });
        }
        let mut value = || -> Result<&str, Problem> {
            let v = words
                .get(i)
                .ok_or_else(|| Problem::MissingValue(option.into()))?;
            i += 1;
            Ok(v.as_str())
        };
        match (option, &mut module) {
            ("-s" | "--source", _) => matches.push(Match::Source {
                net: network(option, value()?)?,
                negated: not,
            }),
            ("-d" | "--destination", _) => matches.push(Match::Destination {
                net: network(option, value()?)?,
                negated: not,
            }),
            ("-p" | "--protocol", _) => {
                let p = protocol(option, value()?)?;
                if !not {
                    proto = Some(p);
                }
                matches.push(Match::Protocol {
                    protocol: p,
                    negated: not,
                });
            }
            ("-m" | "--match", _) => {
                if not {
                    return Err(Problem::Negation(option.into()));
                }
                let name = value()?;
                let next = match name {
                    "tcp" | "udp" | "sctp" => {
                        let p = protocol(option, name)?;
                        if proto != Some(p) {
                            return Err(Problem::ProtocolModule(name.into()));
                        }
                        Module::Port
                    }
                    "addrtype" => Module::AddrType,
                    "comment" => Module::Comment,
                    "statistic" => Module::Statistic {
                        random: false,
                        probability: None,
                    },
                    "recent" => Module::Recent {
                        name: None,
                        check: false,
                        set: false,
                        seconds: None,
                        reap: false,
                    },
                    "mark" => Module::Mark,
                    "conntrack" => Module::Conntrack,
                    other => return Err(Problem::UnknownModule(other.into())),
                };
                std::mem::replace(&mut module, next).finish(&mut matches)?;
            }
            // `-p tcp --dport N` loads the protocol's match implicitly.
            ("--dport" | "--destination-port", _) if proto.is_some() => {
                let v = value()?;
                let port = v.parse().map_err(|_| bad(option, v))?;
                matches.push(Match::DestinationPort { port, negated: not });
            }
            ("--dst-type" | "--src-type", Module::AddrType) => {
                let v = value()?;
                if v != "LOCAL" {
                    return Err(bad(option, v));
                }
                matches.push(Match::LocalAddress {
                    source: option == "--src-type",
                    negated: not,
                });
            }
            ("--comment", Module::Comment) => {
                value()?;
                if not {
                    return Err(Problem::Negation(option.into()));
                }
            }
            ("--mode", Module::Statistic { random, .. }) => {
                let v = value()?;
                if v != "random" || not {
                    return Err(bad(option, v));
                }
                *random = true;
            }
            ("--probability", Module::Statistic { probability, .. }) => {
                let v = value()?;
                let p: f64 = v.parse().map_err(|_| bad(option, v))?;
                if not || !(0.0..=1.0).contains(&p) {
                    return Err(bad(option, v));
                }
                *probability = Some(p);
            }
            ("--name", Module::Recent { name, .. }) if !not => {
                *name = Some(value()?.to_string());
            }
            ("--rcheck", Module::Recent { check, .. }) if !not => *check = true,
            ("--set", Module::Recent { set, .. }) if !not => *set = true,
            ("--reap", Module::Recent { reap, .. }) if !not => *reap = true,
            ("--seconds", Module::Recent { seconds, .. }) if !not => {
                let v = value()?;
                *seconds = Some(v.parse().map_err(|_| bad(option, v))?);
            }
            ("--mark", Module::Mark) => {
                let (value, mask) = value_mask(option, value()?)?;
                matches.push(Match::Mark {
                    value,
                    mask,
                    negated: not,
                });
            }
            ("--ctstate", Module::Conntrack) => {
                let v = value()?;
                let states = v
                    .split(',')
                    .map(|s| match s {
                        "NEW" => Ok(CtState::New),
                        "ESTABLISHED" => Ok(CtState::Established),
                        "RELATED" => Ok(CtState::Related),
                        "INVALID" => Ok(CtState::Invalid),
                        "UNTRACKED" => Ok(CtState::Untracked),
                        "DNAT" => Ok(CtState::Dnat),
                        "SNAT" => Ok(CtState::Snat),
                        _ => Err(bad(option, v)),
                    })
                    .collect::<Result<_, _>>()?;
                matches.push(Match::CtState {
                    states,
                    negated: not,
                });
            }
            _ => return Err(Problem::UnknownOption(option.into())),
        }
    }
    Err(Problem::NoTarget)
}

fn parse_target(target: &str, options: &[String], table: Table) -> Result<Action, Problem> {
    let unexpected = |option: &str| Problem::TargetOption {
        target: target.into(),
        option: option.into(),
    };
    let wrong_table = || Problem::TargetTable {
        target: target.into(),
        table,
    };
    let only = |want: &[&str]| -> Result<(), Problem> {
        match options.iter().find(|o| !want.contains(&o.as_str())) {
            Some(o) => Err(unexpected(o)),
            None => Ok(()),
        }
    };
    let action = match target {
        "ACCEPT" => Action::Accept,
        "RETURN" => Action::Return,
        // Filtering in nat is refused by iptables.
        "DROP" | "REJECT" if table != Table::Filter => return Err(wrong_table()),
        "DROP" => Action::Drop,
        "REJECT" => {
            match options {
                [] => {}
                [o, t] if o == "--reject-with" => match t.as_str() {
                    "icmp-port-unreachable" | "icmp-host-unreachable" | "tcp-reset" => {}
                    _ => return Err(bad(o, t)),
                },
                [o, ..] => return Err(unexpected(o)),
            }
            return Ok(Action::Reject);
        }
        "DNAT" | "MASQUERADE" if table != Table::Nat => return Err(wrong_table()),
        "DNAT" => {
            let [o, to] = options else {
                return Err(match options.first() {
                    Some(o) if o != "--to-destination" => unexpected(o),
                    _ => Problem::MissingValue("--to-destination".into()),
                });
            };
            if o != "--to-destination" {
                return Err(unexpected(o));
            }
            let (ip, port) = if let Ok(ip) = to.parse::<IpAddr>() {
                (ip, None)
            } else {
                let (ip, port) = to.rsplit_once(':').ok_or_else(|| bad(o, to))?;
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                (
                    ip.parse().map_err(|_| bad(o, to))?,
                    Some(port.parse().map_err(|_| bad(o, to))?),
                )
            };
            return Ok(Action::Dnat { ip, port });
        }
        "MASQUERADE" => {
            only(&["--random-fully", "--random"])?;
            return Ok(Action::Masquerade);
        }
        "MARK" => {
            let [o, v] = options else {
                return Err(match options.first() {
                    Some(o) => unexpected(o),
                    None => Problem::MissingValue("MARK".into()),
                });
            };
            let op = match o.as_str() {
                "--or-mark" => MarkOp::Or(number(o, v)?),
                "--xor-mark" => MarkOp::Xor(number(o, v)?),
                "--and-mark" => MarkOp::And(number(o, v)?),
                "--set-xmark" => {
                    let (value, mask) = value_mask(o, v)?;
                    MarkOp::SetX { value, mask }
                }
                "--set-mark" => {
                    let (value, mask) = value_mask(o, v)?;
                    MarkOp::Set { value, mask }
                }
                _ => return Err(unexpected(o)),
            };
            return Ok(Action::Mark(op));
        }
        // Anything else is a chain; whether it exists is checked per table.
        chain => Action::Jump(chain.into()),
    };
    only(&[])?;
    Ok(action)
}

/// One path's packet and what happened to it so far.
#[derive(Clone, Debug)]
struct State {
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    protocol: Protocol,
    mark: u32,
    dnat: bool,
    masquerade: bool,
    probability: f64,
    sticky: Option<String>,
    recent_set: Vec<String>,
    affinity: BTreeSet<u32>,
    trail: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// End of chain or RETURN: the caller goes on (a built-in chain's policy, ACCEPT).
    Continue,
    Accept,
    Drop,
    Reject,
}

/// A parsed ruleset with its hooks and the node's local addresses.
pub struct Interpreter {
    chains: BTreeMap<(Table, String), Vec<Rule>>,
    hooks: BTreeMap<(Table, Hook), Vec<Rule>>,
    local: Vec<IpNetwork>,
}

impl Interpreter {
    /// Parse every rule of `rs` and `hooks` (also rules no packet reaches).
    /// `addresses` are the node's own; 127.0.0.0/8 is always local.
    pub fn new(rs: &Ruleset, hooks: &Hooks, addresses: &[IpAddr]) -> Result<Interpreter, SimError> {
        let mut local: Vec<IpNetwork> = addresses.iter().map(|ip| IpNetwork::from(*ip)).collect();
        local.push(
            IpNetwork::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("valid prefix"),
        );
        let parse = |table: Table, chain: &str, rules: &[String]| {
            rules
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    parse_rule(text, table).map_err(|problem| SimError::Parse {
                        table,
                        chain: chain.into(),
                        index,
                        rule: text.clone(),
                        problem,
                    })
                })
                .collect::<Result<Vec<Rule>, SimError>>()
        };
        let mut chains = BTreeMap::new();
        for (table, map) in [(Table::Nat, &rs.nat), (Table::Filter, &rs.filter)] {
            for (chain, rules) in map {
                chains.insert((table, chain.clone()), parse(table, chain, rules)?);
            }
        }
        let mut hook_rules = BTreeMap::new();
        for (table, hook, given) in [
            (Table::Nat, Hook::Prerouting, &hooks.nat_prerouting),
            (Table::Nat, Hook::Output, &hooks.nat_output),
            (Table::Nat, Hook::Postrouting, &hooks.nat_postrouting),
            (Table::Filter, Hook::Input, &hooks.filter_input),
            (Table::Filter, Hook::Forward, &hooks.filter_forward),
            (Table::Filter, Hook::Output, &hooks.filter_output),
        ] {
            let rules = match chains.remove(&(table, hook.chain().to_string())) {
                Some(from_ruleset) => from_ruleset,
                None => parse(table, hook.chain(), given)?,
            };
            hook_rules.insert((table, hook), rules);
        }
        let interpreter = Interpreter {
            chains,
            hooks: hook_rules,
            local,
        };
        interpreter.check_jumps()?;
        Ok(interpreter)
    }

    /// Every jump inside the ruleset lands on a chain of its table; hooks may
    /// name weft chains the ruleset does not have (yet): those are empty.
    fn check_jumps(&self) -> Result<(), SimError> {
        let hooked = self
            .hooks
            .iter()
            .map(|((table, hook), rules)| ((*table, hook.chain().to_string(), true), rules));
        let own = self
            .chains
            .iter()
            .map(|((table, chain), rules)| ((*table, chain.clone(), false), rules));
        for ((table, chain, is_hook), rules) in hooked.chain(own) {
            for rule in rules {
                if let Action::Jump(target) = &rule.action {
                    let defined = self.chains.contains_key(&(table, target.clone()));
                    let may_be_missing = is_hook && target.starts_with("WEFT-");
                    if !defined && !may_be_missing {
                        return Err(SimError::UnknownChain {
                            table,
                            chain,
                            target: target.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn local(&self, ip: IpAddr) -> bool {
        self.local.iter().any(|n| n.contains(ip))
    }

    /// Every path `p` may take, and its outcome.
    pub fn run(&self, p: &SimPacket) -> Result<Simulation, SimError> {
        let start = State {
            src: p.src,
            dst: p.dst,
            port: p.port,
            protocol: p.protocol,
            mark: 0,
            dnat: false,
            masquerade: false,
            probability: 1.0,
            sticky: None,
            recent_set: Vec::new(),
            affinity: BTreeSet::new(),
            trail: Vec::new(),
        };
        let mut done = Vec::new();
        let passed = match p.origin {
            Origin::Node => {
                let s = self.hook(Table::Nat, Hook::Output, vec![start], &mut done)?;
                let s = self.hook(Table::Filter, Hook::Output, s, &mut done)?;
                self.hook(Table::Nat, Hook::Postrouting, s, &mut done)?
            }
            Origin::Arriving => {
                let s = self.hook(Table::Nat, Hook::Prerouting, vec![start], &mut done)?;
                // Routing after DNAT. Delivered locally, a packet meets nat
                // INPUT (where weft has no rules), never POSTROUTING.
                let (martians, s): (Vec<State>, Vec<State>) = s
                    .into_iter()
                    .partition(|s| s.dst.is_loopback() && !p.route_localnet);
                for mut m in martians {
                    m.trail.push("routing: martian destination".into());
                    done.push((m, Outcome::Drop));
                }
                let (to_me, onward): (Vec<State>, Vec<State>) =
                    s.into_iter().partition(|s| self.local(s.dst));
                let mut s = self.hook(Table::Filter, Hook::Input, to_me, &mut done)?;
                let onward = self.hook(Table::Filter, Hook::Forward, onward, &mut done)?;
                s.extend(self.hook(Table::Nat, Hook::Postrouting, onward, &mut done)?);
                s
            }
        };
        let branch = |s: State, outcome| Branch {
            outcome,
            probability: s.probability,
            sticky: s.sticky,
            recent_set: s.recent_set,
            affinity: s.affinity,
            trail: s.trail,
        };
        let mut branches: Vec<Branch> = done.into_iter().map(|(s, o)| branch(s, o)).collect();
        for s in passed {
            let outcome = if s.dnat {
                Outcome::Dnat {
                    ip: s.dst,
                    port: s.port,
                    masquerade: s.masquerade,
                }
            } else {
                Outcome::Pass {
                    masquerade: s.masquerade,
                }
            };
            branches.push(branch(s, outcome));
        }
        Ok(Simulation { branches })
    }

    /// Run `states` through a built-in chain; dropped and rejected paths end
    /// in `done`, the others go on.
    fn hook(
        &self,
        table: Table,
        hook: Hook,
        states: Vec<State>,
        done: &mut Vec<(State, Outcome)>,
    ) -> Result<Vec<State>, SimError> {
        let mut out = Vec::new();
        for s in states {
            for (s, flow) in self.chain(table, hook, None, s, 0)? {
                match flow {
                    Flow::Continue | Flow::Accept => out.push(s),
                    Flow::Drop => done.push((s, Outcome::Drop)),
                    Flow::Reject => done.push((s, Outcome::Reject)),
                }
            }
        }
        Ok(out)
    }

    /// Every way through one chain (`None`: the hook's built-in chain).
    fn chain(
        &self,
        table: Table,
        hook: Hook,
        name: Option<&str>,
        state: State,
        depth: usize,
    ) -> Result<Vec<(State, Flow)>, SimError> {
        let chain = name.unwrap_or(hook.chain());
        if depth > MAX_DEPTH {
            return Err(SimError::TooDeep {
                chain: chain.into(),
            });
        }
        let rules: &[Rule] = match name {
            None => &self.hooks[&(table, hook)],
            // Missing only when a hook names a chain the ruleset lacks.
            Some(c) => self
                .chains
                .get(&(table, c.to_string()))
                .map_or(&[], Vec::as_slice),
        };
        let mut out = Vec::new();
        let mut work = vec![(0, state)];
        while let Some((i, s)) = work.pop() {
            let Some(rule) = rules.get(i) else {
                out.push((s, Flow::Continue));
                continue;
            };
            for (mut s, hit) in self.evaluate(rule, s) {
                if !hit {
                    work.push((i + 1, s));
                    continue;
                }
                s.trail.push(format!("{table} {chain}#{i}: {}", rule.text));
                let wrong_hook = || SimError::WrongHook {
                    table,
                    chain: chain.into(),
                    rule: rule.text.clone(),
                    hook,
                };
                match &rule.action {
                    Action::Jump(target) => {
                        for (s, flow) in self.chain(table, hook, Some(target), s, depth + 1)? {
                            match flow {
                                Flow::Continue => work.push((i + 1, s)),
                                flow => out.push((s, flow)),
                            }
                        }
                    }
                    Action::Return => out.push((s, Flow::Continue)),
                    Action::Accept => out.push((s, Flow::Accept)),
                    Action::Drop => out.push((s, Flow::Drop)),
                    Action::Reject => {
                        if !matches!(hook, Hook::Input | Hook::Forward | Hook::Output) {
                            return Err(wrong_hook());
                        }
                        out.push((s, Flow::Reject));
                    }
                    Action::Mark(op) => {
                        s.mark = op.apply(s.mark);
                        work.push((i + 1, s));
                    }
                    Action::Dnat { ip, port } => {
                        if !matches!(hook, Hook::Prerouting | Hook::Output) {
                            return Err(wrong_hook());
                        }
                        s.dst = *ip;
                        s.port = port.unwrap_or(s.port);
                        s.dnat = true;
                        out.push((s, Flow::Accept));
                    }
                    Action::Masquerade => {
                        if hook != Hook::Postrouting {
                            return Err(wrong_hook());
                        }
                        s.masquerade = true;
                        out.push((s, Flow::Accept));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The rule's matches in order: each path on which they all hold (true)
    /// or one fails (false). Random and affinity matches fork the path.
    fn evaluate(&self, rule: &Rule, state: State) -> Vec<(State, bool)> {
        let mut live = vec![state];
        let mut out = Vec::new();
        for m in &rule.matches {
            let mut next = Vec::new();
            for mut s in live {
                let holds = |cond: bool, negated: bool| cond != negated;
                let hit = match m {
                    Match::Source { net, negated } => holds(net.contains(s.src), *negated),
                    Match::Destination { net, negated } => holds(net.contains(s.dst), *negated),
                    Match::Protocol { protocol, negated } => {
                        holds(s.protocol == *protocol, *negated)
                    }
                    Match::DestinationPort { port, negated } => holds(s.port == *port, *negated),
                    Match::LocalAddress { source, negated } => {
                        holds(self.local(if *source { s.src } else { s.dst }), *negated)
                    }
                    Match::Mark {
                        value,
                        mask,
                        negated,
                    } => holds(s.mark & mask == *value, *negated),
                    Match::CtState { states, negated } => {
                        // The first packet of a connection: NEW, and DNAT once translated.
                        let any = states.iter().any(|st| match st {
                            CtState::New => true,
                            CtState::Dnat => s.dnat,
                            _ => false,
                        });
                        holds(any, *negated)
                    }
                    Match::RecentSet { name } => {
                        s.recent_set.push(name.clone());
                        true
                    }
                    Match::Statistic { probability } => {
                        let p = *probability;
                        if p > 0.0 {
                            let mut taken = s.clone();
                            taken.probability *= p;
                            next.push(taken);
                        }
                        if p < 1.0 {
                            s.probability *= 1.0 - p;
                            out.push((s, false));
                        }
                        continue;
                    }
                    Match::RecentCheck { name, seconds } => {
                        // A returning client is on the list, a new one is not.
                        s.affinity.insert(*seconds);
                        let mut returning = s.clone();
                        if returning.sticky.is_none() {
                            returning.sticky = Some(name.clone());
                        }
                        next.push(returning);
                        out.push((s, false));
                        continue;
                    }
                };
                if hit {
                    next.push(s);
                } else {
                    out.push((s, false));
                }
            }
            live = next;
        }
        out.extend(live.into_iter().map(|s| (s, true)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, backend as be, node_port_service, CLUSTER_CIDR, NODE};
    use super::super::iptables::render;
    use super::super::plan::ServicePlan;
    use super::super::tracer::{trace, Packet, Source, Verdict};
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use weft_model::view::{FrontendPort, ServiceType};
    use weft_model::{Backend, BackendPort, ServiceEntry};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn node_ip() -> IpAddr {
        ip(fixtures::NODE_IP)
    }

    /// The rules for `plan` behind the hooks the dataplane installs.
    fn interpreter(plan: &ServicePlan) -> Interpreter {
        let rs = render(plan, CLUSTER_CIDR);
        let hooks = Hooks::installed().expect("known hooks");
        Interpreter::new(&rs, &hooks, &[node_ip()]).unwrap_or_else(|e| panic!("{e}\n{rs:#?}"))
    }

    /// The tracer's packet as it enters netfilter.
    fn sim_packet(p: &Packet) -> SimPacket {
        let (origin, src) = match &p.src {
            Source::Node if p.dst.is_loopback() => (Origin::Node, ip("127.0.0.1")),
            Source::Node => (Origin::Node, node_ip()),
            Source::LocalPod(a) | Source::RemotePod(a) | Source::External(a) => {
                (Origin::Arriving, *a)
            }
        };
        SimPacket {
            origin,
            src,
            protocol: p.protocol,
            dst: p.dst,
            port: p.port,
            // Local pods arrive on weft's bridge.
            route_localnet: matches!(p.src, Source::LocalPod(_)),
        }
    }

    /// The outcomes the tracer's verdict allows, each with its probability
    /// for a client without affinity.
    fn expected(p: &Packet, v: &Verdict) -> BTreeMap<Outcome, f64> {
        let mut out = BTreeMap::new();
        match v {
            // Nothing from off the node may reach its loopback: the kernel
            // drops it as a martian, or (on weft's bridge, which routes
            // 127.0.0.0/8 for localhost NodePorts and hostPorts) the firewall.
            Verdict::PassThrough if p.src != Source::Node && p.dst.is_loopback() => {
                out.insert(Outcome::Drop, 1.0);
            }
            Verdict::PassThrough => {
                out.insert(Outcome::Pass { masquerade: false }, 1.0);
            }
            Verdict::Reject { .. } => {
                out.insert(Outcome::Reject, 1.0);
            }
            Verdict::Drop { .. } => {
                out.insert(Outcome::Drop, 1.0);
            }
            Verdict::Dnat { backends, .. } => {
                for c in backends {
                    let o = Outcome::Dnat {
                        ip: c.target.ip,
                        port: c.target.port,
                        masquerade: c.masquerade,
                    };
                    *out.entry(o).or_insert(0.0) += 1.0 / backends.len() as f64;
                }
            }
        }
        out
    }

    /// Where the rules and the tracer part ways for `p`, if they do.
    fn disagreement(plan: &ServicePlan, sim: &Interpreter, p: &Packet) -> Option<String> {
        let verdict = trace(plan, p);
        let run = match sim.run(&sim_packet(p)) {
            Ok(run) => run,
            Err(e) => return Some(format!("{p:?}: interpreter error: {e}")),
        };
        let want = expected(p, &verdict);
        let got = run.outcomes();
        let report = |what: &str| {
            Some(format!(
                "{p:?}: {what}\ntracer: {verdict:?}\nrules:\n{}",
                run.trails()
            ))
        };
        if got != want.keys().cloned().collect() {
            return report(&format!("outcomes {got:?}"));
        }
        let fresh = run.fresh();
        for (o, p) in &want {
            let q = fresh.get(o).copied().unwrap_or(0.0);
            if (p - q).abs() > 1e-6 {
                return report(&format!("{o:?} has probability {q}, not {p}"));
            }
        }
        let affinity = match &verdict {
            Verdict::Dnat {
                affinity_timeout, ..
            } => affinity_timeout.iter().copied().collect(),
            _ => BTreeSet::new(),
        };
        if run.affinity() != affinity {
            return report(&format!("affinity {:?}", run.affinity()));
        }
        if let Err(e) = sticky_paths_agree(&run) {
            return report(&e);
        }
        None
    }

    /// A client on a `recent` list goes where being put on it led, and with
    /// affinity every translation puts the client on a list.
    fn sticky_paths_agree(run: &Simulation) -> Result<(), String> {
        let mut led_to: BTreeMap<&str, (IpAddr, u16)> = BTreeMap::new();
        let target = |o: &Outcome| match o {
            Outcome::Dnat { ip, port, .. } => Some((*ip, *port)),
            _ => None,
        };
        for b in &run.branches {
            let Some(t) = target(&b.outcome) else {
                continue;
            };
            if !run.affinity().is_empty() && b.recent_set.is_empty() {
                return Err(format!("{t:?} is reached without a recent --set"));
            }
            for name in &b.recent_set {
                if let Some(other) = led_to.insert(name, t) {
                    if other != t {
                        return Err(format!("list {name} is set for {other:?} and {t:?}"));
                    }
                }
            }
        }
        for b in &run.branches {
            if let Some(name) = &b.sticky {
                if target(&b.outcome) != led_to.get(name.as_str()).copied() {
                    return Err(format!(
                        "a client on list {name} ends at {:?}, not {:?}",
                        b.outcome,
                        led_to.get(name.as_str())
                    ));
                }
            }
        }
        Ok(())
    }

    #[track_caller]
    fn agrees(plan: &ServicePlan, p: &Packet) -> BTreeSet<Outcome> {
        let sim = interpreter(plan);
        if let Some(d) = disagreement(plan, &sim, p) {
            panic!("render and tracer disagree: {d}");
        }
        sim.run(&sim_packet(p)).expect("checked").outcomes()
    }

    fn tcp(src: Source, dst: &str, port: u16) -> Packet {
        Packet {
            src,
            protocol: Protocol::TCP,
            dst: ip(dst),
            port,
        }
    }

    fn pod(a: &str) -> Source {
        Source::LocalPod(ip(a))
    }

    fn outside() -> Source {
        Source::External(ip("198.19.255.10"))
    }

    fn dnat(to: &str, masquerade: bool) -> Outcome {
        Outcome::Dnat {
            ip: ip(to),
            port: 8080,
            masquerade,
        }
    }

    fn set<const N: usize>(o: [Outcome; N]) -> BTreeSet<Outcome> {
        o.into_iter().collect()
    }

    fn web(backends: Vec<Backend>) -> ServiceEntry {
        ServiceEntry {
            external_ips: vec![ip("198.19.255.50")],
            ..node_port_service("web", backends)
        }
    }

    fn two_nodes() -> Vec<Backend> {
        vec![
            be("198.18.128.5", NODE, true, true, false),
            be("198.18.129.5", "node-2", true, true, false),
        ]
    }

    #[test]
    fn cluster_ip_from_pods_the_node_and_outside() {
        let plan = fixtures::plan(vec![web(two_nodes())]);
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.9"), "198.19.0.20", 80)),
            set([dnat("198.18.128.5", false), dnat("198.18.129.5", false)])
        );
        assert_eq!(
            agrees(
                &plan,
                &tcp(Source::RemotePod(ip("198.18.129.9")), "198.19.0.20", 80)
            ),
            set([dnat("198.18.128.5", false), dnat("198.18.129.5", false)])
        );
        assert_eq!(
            agrees(&plan, &tcp(Source::Node, "198.19.0.20", 80)),
            set([dnat("198.18.128.5", true), dnat("198.18.129.5", true)])
        );
        assert_eq!(
            agrees(&plan, &tcp(outside(), "198.19.0.20", 80)),
            set([dnat("198.18.128.5", true), dnat("198.18.129.5", true)])
        );
        let miss = set([Outcome::Pass { masquerade: false }]);
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.9"), "198.19.0.20", 81)),
            miss
        );
        let udp = Packet {
            protocol: Protocol::UDP,
            ..tcp(pod("198.18.128.9"), "198.19.0.20", 80)
        };
        assert_eq!(agrees(&plan, &udp), miss);
    }

    #[test]
    fn node_ports_and_external_ips_masquerade_under_cluster_policy() {
        let plan = fixtures::plan(vec![web(two_nodes())]);
        let all_masq = set([dnat("198.18.128.5", true), dnat("198.18.129.5", true)]);
        assert_eq!(
            agrees(&plan, &tcp(outside(), fixtures::NODE_IP, 30080)),
            all_masq
        );
        assert_eq!(
            agrees(&plan, &tcp(Source::Node, fixtures::NODE_IP, 30080)),
            all_masq
        );
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.9"), fixtures::NODE_IP, 30080)),
            all_masq
        );
        assert_eq!(
            agrees(&plan, &tcp(outside(), "198.19.255.50", 80)),
            all_masq
        );
        assert_eq!(
            agrees(&plan, &tcp(outside(), "127.0.0.1", 30080)),
            set([Outcome::Drop]),
            "no NodePorts on loopback, and no way in from off the node"
        );
        assert_eq!(
            agrees(&plan, &tcp(Source::Node, "127.0.0.1", 30080)),
            set([Outcome::Pass { masquerade: false }]),
            "no NodePorts on loopback"
        );
        // From a pod on weft's bridge: pods_cannot_reach_the_node_loopback.
    }

    #[test]
    fn external_policy_local_with_a_local_endpoint() {
        let plan = fixtures::plan(vec![ServiceEntry {
            external_local: true,
            ..web(two_nodes())
        }]);
        assert_eq!(
            agrees(&plan, &tcp(outside(), fixtures::NODE_IP, 30080)),
            set([dnat("198.18.128.5", false)]),
            "outside clients keep their address and reach local endpoints only"
        );
        assert_eq!(
            agrees(&plan, &tcp(outside(), "198.19.255.50", 80)),
            set([dnat("198.18.128.5", false)])
        );
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.9"), fixtures::NODE_IP, 30080)),
            set([dnat("198.18.128.5", false), dnat("198.18.129.5", false)]),
            "pods use every endpoint"
        );
        assert_eq!(
            agrees(&plan, &tcp(Source::Node, fixtures::NODE_IP, 30080)),
            set([dnat("198.18.128.5", true), dnat("198.18.129.5", true)])
        );
    }

    #[test]
    fn external_policy_local_without_a_local_endpoint() {
        let plan = fixtures::plan(vec![ServiceEntry {
            external_local: true,
            ..web(vec![be("198.18.129.5", "node-2", true, true, false)])
        }]);
        assert_eq!(
            agrees(&plan, &tcp(outside(), fixtures::NODE_IP, 30080)),
            set([Outcome::Drop])
        );
        assert_eq!(
            agrees(&plan, &tcp(outside(), "198.19.255.50", 80)),
            set([Outcome::Drop])
        );
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.9"), fixtures::NODE_IP, 30080)),
            set([dnat("198.18.129.5", false)])
        );
    }

    #[test]
    fn internal_policy_local() {
        let with_local = fixtures::plan(vec![ServiceEntry {
            internal_local: true,
            ..web(two_nodes())
        }]);
        assert_eq!(
            agrees(&with_local, &tcp(pod("198.18.128.9"), "198.19.0.20", 80)),
            set([dnat("198.18.128.5", false)])
        );
        assert_eq!(
            agrees(&with_local, &tcp(Source::Node, "198.19.0.20", 80)),
            set([dnat("198.18.128.5", true)])
        );
        // Without a local endpoint: itp_local_without_a_local_endpoint_drops.
    }

    #[test]
    fn no_usable_endpoint_is_rejected_everywhere() {
        for backends in [vec![], vec![be("198.18.128.5", NODE, false, false, false)]] {
            let plan = fixtures::plan(vec![web(backends)]);
            for p in [
                tcp(pod("198.18.128.9"), "198.19.0.20", 80),
                tcp(Source::Node, "198.19.0.20", 80),
                tcp(outside(), fixtures::NODE_IP, 30080),
                tcp(Source::Node, fixtures::NODE_IP, 30080),
                tcp(outside(), "198.19.255.50", 80),
            ] {
                assert_eq!(agrees(&plan, &p), set([Outcome::Reject]), "{p:?}");
            }
        }
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let plan = fixtures::plan(vec![web(vec![
            be("198.18.128.5", NODE, false, true, true),
            be("198.18.128.6", NODE, false, false, true),
        ])]);
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.9"), "198.19.0.20", 80)),
            set([dnat("198.18.128.5", false)])
        );
        let plan = fixtures::plan(vec![web(vec![
            be("198.18.128.5", NODE, false, true, true),
            be("198.18.129.8", "node-2", true, true, false),
        ])]);
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.9"), "198.19.0.20", 80)),
            set([dnat("198.18.129.8", false)])
        );
    }

    #[test]
    fn affinity_sends_returning_clients_back() {
        let plan = fixtures::plan(vec![ServiceEntry {
            affinity_timeout: Some(60),
            ..web(two_nodes())
        }]);
        let p = tcp(pod("198.18.128.9"), "198.19.0.20", 80);
        assert_eq!(
            agrees(&plan, &p),
            set([dnat("198.18.128.5", false), dnat("198.18.129.5", false)])
        );
        let run = interpreter(&plan).run(&sim_packet(&p)).expect("runs");
        assert_eq!(run.affinity(), BTreeSet::from([60]));
        assert!(run.branches.iter().any(|b| b.sticky.is_some()));
        sticky_paths_agree(&run).expect("sticky paths");
    }

    #[test]
    fn hairpin_is_masqueraded() {
        let plan = fixtures::plan(vec![web(two_nodes())]);
        assert_eq!(
            agrees(&plan, &tcp(pod("198.18.128.5"), "198.19.0.20", 80)),
            set([dnat("198.18.128.5", true), dnat("198.18.129.5", false)])
        );
    }

    // Disagreements the property found in render() before 9510770 ("the
    // iptables service dataplane, live"), shrunk; that commit fixed them.

    #[test]
    fn itp_local_without_a_local_endpoint_drops() {
        // Was: the internal chain had no endpoint and the packet went on untranslated.
        let plan = fixtures::plan(vec![ServiceEntry {
            internal_local: true,
            ..web(vec![be("198.18.129.5", "node-2", true, true, false)])
        }]);
        for src in [pod("198.18.128.9"), Source::Node, outside()] {
            assert_eq!(
                agrees(&plan, &tcp(src, "198.19.0.20", 80)),
                set([Outcome::Drop])
            );
        }
    }

    #[test]
    fn itp_local_leaves_external_traffic_alone() {
        // Was: under externalTrafficPolicy: Cluster the external chain jumped
        // to the internal chain, which held only the local endpoints.
        let plan = fixtures::plan(vec![ServiceEntry {
            internal_local: true,
            ..web(two_nodes())
        }]);
        assert_eq!(
            agrees(&plan, &tcp(outside(), fixtures::NODE_IP, 30080)),
            set([dnat("198.18.128.5", true), dnat("198.18.129.5", true)])
        );
    }

    #[test]
    fn node_port_reject_only_on_node_addresses() {
        // Was: `-m addrtype --dst-type LOCAL`, so 127.0.0.1:30080 too.
        let plan = fixtures::plan(vec![web(vec![])]);
        assert_eq!(
            agrees(&plan, &tcp(Source::Node, "127.0.0.1", 30080)),
            set([Outcome::Pass { masquerade: false }])
        );
        assert_eq!(
            agrees(&plan, &tcp(Source::Node, fixtures::NODE_IP, 30080)),
            set([Outcome::Reject])
        );
    }

    #[test]
    fn pods_cannot_reach_the_node_loopback() {
        // Was: nothing stopped it once route_localnet is set on weft's bridge.
        let plan = fixtures::plan(vec![web(two_nodes())]);
        for port in [53, 30080] {
            assert_eq!(
                agrees(&plan, &tcp(pod("198.18.128.9"), "127.0.0.1", port)),
                set([Outcome::Drop])
            );
        }
    }

    // The interpreter itself.

    fn ruleset(nat: &[(&str, &[&str])], filter: &[(&str, &[&str])]) -> Ruleset {
        let table = |chains: &[(&str, &[&str])]| {
            chains
                .iter()
                .map(|(c, rules)| (c.to_string(), rules.iter().map(|r| r.to_string()).collect()))
                .collect()
        };
        Ruleset {
            nat: table(nat),
            filter: table(filter),
        }
    }

    fn from_pod(dst: &str, port: u16) -> SimPacket {
        SimPacket {
            origin: Origin::Arriving,
            src: ip("198.18.128.9"),
            protocol: Protocol::TCP,
            dst: ip(dst),
            port,
            route_localnet: true,
        }
    }

    #[test]
    fn unknown_rule_shapes_are_errors() {
        for (rule, problem) in [
            (
                "-p tcp -m multiport --dports 80,443 -j ACCEPT",
                Problem::UnknownModule("multiport".into()),
            ),
            (
                "-p tcp --sport 80 -j ACCEPT",
                Problem::UnknownOption("--sport".into()),
            ),
            (
                "-m tcp --dport 80 -j ACCEPT",
                Problem::ProtocolModule("tcp".into()),
            ),
            (
                "--dport 80 -j ACCEPT",
                Problem::UnknownOption("--dport".into()),
            ),
            (
                "-m addrtype --dst-type UNICAST -j ACCEPT",
                bad("--dst-type", "UNICAST"),
            ),
            (
                "-m statistic --mode nth --every 2 -j ACCEPT",
                bad("--mode", "nth"),
            ),
            (
                "-m recent --rcheck --seconds 5 -j ACCEPT",
                Problem::Incomplete {
                    module: "recent",
                    missing: "--name",
                },
            ),
            ("-s 198.18.0.0/15", Problem::NoTarget),
            (
                "-j MASQUERADE --to-ports 1000",
                Problem::TargetOption {
                    target: "MASQUERADE".into(),
                    option: "--to-ports".into(),
                },
            ),
            (
                "-j DROP",
                Problem::TargetTable {
                    target: "DROP".into(),
                    table: Table::Nat,
                },
            ),
            (
                "-j WEFT-X --to-destination 1.2.3.4",
                Problem::TargetOption {
                    target: "WEFT-X".into(),
                    option: "--to-destination".into(),
                },
            ),
            ("-m comment --comment \"open -j ACCEPT", Problem::Quote),
        ] {
            assert_eq!(parse_rule(rule, Table::Nat).err(), Some(problem), "{rule}");
        }
        let rs = ruleset(&[("WEFT-SERVICES", &["-j WEFT-NOWHERE"])], &[]);
        assert!(matches!(
            Interpreter::new(&rs, &Hooks::weft_default(), &[]),
            Err(SimError::UnknownChain { .. })
        ));
        let hooks = Hooks {
            nat_prerouting: vec!["-j KUBE-SERVICES".into()],
            ..Hooks::default()
        };
        assert!(
            matches!(
                Interpreter::new(&Ruleset::default(), &hooks, &[]),
                Err(SimError::UnknownChain { .. })
            ),
            "only missing weft chains count as empty"
        );
    }

    #[test]
    fn targets_are_checked_against_the_hook() {
        let rs = ruleset(
            &[("WEFT-SNAT", &["-j DNAT --to-destination 198.18.128.5:80"])],
            &[],
        );
        let sim = Interpreter::new(&rs, &Hooks::weft_default(), &[]).expect("parses");
        assert!(matches!(
            sim.run(&from_pod("198.19.0.1", 80)),
            Err(SimError::WrongHook {
                hook: Hook::Postrouting,
                ..
            })
        ));
    }

    #[test]
    fn random_branches_and_marks_are_all_explored() {
        let rs = ruleset(
            &[
                (
                    "WEFT-SERVICES",
                    &[
                        "-d 198.19.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment \"a b\" -j WEFT-A",
                    ],
                ),
                (
                    "WEFT-A",
                    &[
                        "-m statistic --mode random --probability 0.2500000000 -j WEFT-B",
                        "-j MARK --set-xmark 0x4000/0x4000",
                        "-j RETURN",
                        "-j WEFT-B",
                    ],
                ),
                (
                    "WEFT-B",
                    &["-p tcp -m tcp -j DNAT --to-destination 198.18.129.1:8080"],
                ),
                (
                    "WEFT-SNAT",
                    &[
                        "-m mark ! --mark 0x4000/0x4000 -j RETURN",
                        "-j MARK --xor-mark 0x4000",
                        "-j MASQUERADE --random-fully",
                    ],
                ),
            ],
            &[(
                "WEFT-SERVICES",
                &["-m conntrack --ctstate NEW,DNAT -m mark --mark 0x4000/0x4000 -j REJECT"],
            )],
        );
        let sim = Interpreter::new(&rs, &Hooks::weft_default(), &[]).expect("parses");
        let run = sim.run(&from_pod("198.19.0.1", 80)).expect("runs");
        let fresh = run.fresh();
        assert_eq!(run.outcomes().len(), 2, "{}", run.trails());
        assert!((fresh[&Outcome::Reject] - 0.75).abs() < 1e-9);
        let translated = Outcome::Dnat {
            ip: ip("198.18.129.1"),
            port: 8080,
            masquerade: false,
        };
        assert!((fresh[&translated] - 0.25).abs() < 1e-9);
        assert_eq!(
            sim.run(&from_pod("198.19.0.1", 81))
                .expect("runs")
                .outcomes(),
            set([Outcome::Pass { masquerade: false }])
        );
    }

    #[test]
    fn local_addresses_and_locally_delivered_packets() {
        let rs = ruleset(
            &[
                (
                    "WEFT-SERVICES",
                    &["-m addrtype --dst-type LOCAL -j WEFT-MARK-MASQ"],
                ),
                ("WEFT-MARK-MASQ", &["-j MARK --or-mark 0x4000"]),
                ("WEFT-SNAT", &["-m mark --mark 0x4000/0x4000 -j MASQUERADE"]),
            ],
            &[],
        );
        let sim = Interpreter::new(&rs, &Hooks::weft_default(), &[node_ip()]).expect("parses");
        let masq = |p: SimPacket| sim.run(&p).expect("runs").outcomes();
        // delivered here: marked, but never through POSTROUTING
        assert_eq!(
            masq(from_pod(fixtures::NODE_IP, 22)),
            set([Outcome::Pass { masquerade: false }])
        );
        assert_eq!(
            masq(SimPacket {
                origin: Origin::Node,
                src: ip("127.0.0.1"),
                ..from_pod("127.0.0.53", 53)
            }),
            set([Outcome::Pass { masquerade: true }]),
            "127.0.0.0/8 is local; a local process's packet always leaves through POSTROUTING"
        );
        assert_eq!(
            masq(from_pod("198.19.0.1", 80)),
            set([Outcome::Pass { masquerade: false }])
        );
    }

    // The property: for any small view, the rendered rules do what the tracer says.

    const NODE_2: &str = "node-2";

    #[derive(Clone, Debug)]
    struct GenPort {
        protocol: Protocol,
        port: u16,
        node_port: Option<u16>,
    }

    #[derive(Clone, Debug)]
    struct GenBackend {
        ip: IpAddr,
        /// ready, serving, terminating
        state: (bool, bool, bool),
        /// Which of the Service's ports it has (bit per port).
        ports: u8,
    }

    #[derive(Clone, Debug)]
    struct GenService {
        service_type: ServiceType,
        ports: Vec<GenPort>,
        external_ip_allowed: bool,
        external_ip_denied: bool,
        load_balancer_ip: bool,
        external_local: bool,
        internal_local: bool,
        affinity: Option<u32>,
        backends: Vec<GenBackend>,
    }

    fn gen_protocol() -> impl Strategy<Value = Protocol> {
        prop_oneof![Just(Protocol::TCP), Just(Protocol::UDP)]
    }

    fn gen_backend() -> impl Strategy<Value = GenBackend> {
        let address = prop_oneof![
            8 => (0u8..2, 2u8..7).prop_map(|(node, host)| IpAddr::V4(Ipv4Addr::new(198, 18, 128 + node, host))),
            1 => Just(ip("127.0.0.1")),
            1 => Just(ip("169.254.169.254")),
        ];
        let state = prop_oneof![
            4 => Just((true, true, false)),
            1 => Just((false, false, false)),
            2 => Just((false, true, true)),
            1 => Just((false, false, true)),
        ];
        let ports = prop_oneof![5 => Just(u8::MAX), 1 => any::<u8>()];
        (address, state, ports).prop_map(|(ip, state, ports)| GenBackend { ip, state, ports })
    }

    fn gen_service() -> impl Strategy<Value = GenService> {
        let service_type = prop_oneof![
            Just(ServiceType::ClusterIP),
            Just(ServiceType::NodePort),
            Just(ServiceType::LoadBalancer),
        ];
        let port = (
            gen_protocol(),
            prop::sample::select(vec![80u16, 443, 53]),
            prop::option::weighted(0.8, prop::sample::select(vec![30080u16, 30081, 30082])),
        )
            .prop_map(|(protocol, port, node_port)| GenPort {
                protocol,
                port,
                node_port,
            });
        (
            service_type,
            prop::collection::vec(port, 1..=2),
            any::<(bool, bool, bool)>(),
            any::<(bool, bool)>(),
            prop::option::of(prop::sample::select(vec![60u32, 10800])),
            prop::collection::vec(gen_backend(), 0..=4),
        )
            .prop_map(
                |(
                    service_type,
                    ports,
                    (external_ip_allowed, external_ip_denied, load_balancer_ip),
                    (external_local, internal_local),
                    affinity,
                    backends,
                )| GenService {
                    service_type,
                    ports,
                    external_ip_allowed,
                    external_ip_denied,
                    load_balancer_ip,
                    external_local,
                    internal_local,
                    affinity,
                    backends,
                },
            )
    }

    /// A valid view from generated parts: frontends never collide (the API
    /// server and its allocators see to that).
    fn view(gen: &[GenService]) -> Vec<ServiceEntry> {
        let mut node_ports: BTreeSet<(Protocol, u16)> = BTreeSet::new();
        gen.iter()
            .enumerate()
            .map(|(i, g)| {
                let i = i as u8;
                let exposed = g.service_type != ServiceType::ClusterIP;
                let mut ports: Vec<FrontendPort> = Vec::new();
                for p in &g.ports {
                    if ports
                        .iter()
                        .any(|q| q.port == p.port && q.protocol == p.protocol)
                    {
                        continue;
                    }
                    let node_port = p
                        .node_port
                        .filter(|n| exposed && node_ports.insert((p.protocol, *n)));
                    ports.push(FrontendPort {
                        name: format!("p{}", ports.len()),
                        protocol: p.protocol,
                        port: p.port,
                        node_port,
                    });
                }
                let backends = g
                    .backends
                    .iter()
                    .map(|b| Backend {
                        ip: b.ip,
                        node: Some(
                            if matches!(b.ip, IpAddr::V4(v4) if v4.octets()[2] == 129) {
                                NODE_2
                            } else {
                                NODE
                            }
                            .into(),
                        ),
                        hostname: None,
                        target: None,
                        zone: None,
                        ports: ports
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| b.ports & (1 << j) != 0)
                            .map(|(j, p)| BackendPort {
                                name: p.name.clone(),
                                protocol: p.protocol,
                                port: 8000 + j as u16,
                            })
                            .collect(),
                        ready: b.state.0,
                        serving: b.state.1,
                        terminating: b.state.2,
                    })
                    .collect();
                let mut external_ips = Vec::new();
                if g.external_ip_allowed {
                    external_ips.push(IpAddr::V4(Ipv4Addr::new(198, 19, 255, 50 + i)));
                }
                if g.external_ip_denied {
                    external_ips.push(IpAddr::V4(Ipv4Addr::new(198, 19, 254, 1 + i)));
                }
                let lb = g.service_type == ServiceType::LoadBalancer && g.load_balancer_ip;
                ServiceEntry {
                    namespace: "default".into(),
                    name: format!("s{i}"),
                    service_type: g.service_type,
                    cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10 + i))],
                    ports,
                    external_ips,
                    load_balancer_ips: if lb {
                        vec![IpAddr::V4(Ipv4Addr::new(198, 19, 255, 100 + i))]
                    } else {
                        Vec::new()
                    },
                    affinity_timeout: g.affinity,
                    external_local: exposed && g.external_local,
                    internal_local: g.internal_local,
                    backends,
                    ..Default::default()
                }
            })
            .collect()
    }

    /// Sources worth trying against `plan`: pods on this node (the
    /// endpoints among them for hairpin), pods elsewhere, the node, outside.
    fn sources(plan: &ServicePlan) -> Vec<Source> {
        let mut pods: BTreeSet<(bool, IpAddr)> = BTreeSet::new();
        pods.insert((true, ip("198.18.128.200")));
        pods.insert((false, ip("198.18.129.200")));
        for svc in &plan.services {
            for pb in &svc.backends {
                for t in &pb.cluster {
                    pods.insert((t.local, t.ip));
                }
            }
        }
        let mut out: Vec<Source> = pods
            .into_iter()
            .map(|(local, a)| {
                if local {
                    Source::LocalPod(a)
                } else {
                    Source::RemotePod(a)
                }
            })
            .collect();
        out.push(Source::Node);
        out.push(outside());
        out
    }

    /// A packet from generated choices: to a frontend of the plan or some
    /// other address, with the frontend's protocol and port or others.
    #[derive(Clone, Debug)]
    struct GenPacket {
        source: Index,
        to_frontend: bool,
        frontend: Index,
        other_dst: Index,
        same_port: bool,
        protocol: Protocol,
        port: u16,
    }

    fn gen_packet() -> impl Strategy<Value = GenPacket> {
        (
            any::<Index>(),
            any::<bool>(),
            any::<Index>(),
            any::<Index>(),
            any::<bool>(),
            gen_protocol(),
            prop::sample::select(vec![80u16, 443, 53, 8000, 30080, 30081, 30082]),
        )
            .prop_map(
                |(source, to_frontend, frontend, other_dst, same_port, protocol, port)| GenPacket {
                    source,
                    to_frontend,
                    frontend,
                    other_dst,
                    same_port,
                    protocol,
                    port,
                },
            )
    }

    fn packet(plan: &ServicePlan, g: &GenPacket) -> Packet {
        let srcs = sources(plan);
        let src = g.source.get(&srcs).clone();
        let frontends: Vec<_> = plan.services.iter().flat_map(|s| &s.frontends).collect();
        if g.to_frontend && !frontends.is_empty() {
            let f = g.frontend.get(&frontends);
            let (protocol, port) = if g.same_port {
                (f.protocol, f.port)
            } else {
                (g.protocol, g.port)
            };
            return Packet {
                src,
                protocol,
                dst: f.ip,
                port,
            };
        }
        let others = [
            fixtures::NODE_IP,
            "127.0.0.1",
            "198.19.0.10",
            "198.19.0.99",
            "198.18.128.5",
            "198.18.129.5",
            "198.19.255.50",
            "198.19.254.1",
            "198.19.255.100",
        ];
        Packet {
            src,
            protocol: g.protocol,
            dst: ip(g.other_dst.get::<&str>(&others)),
            port: g.port,
        }
    }

    /// Every source against every frontend, then the generated packets.
    fn check_view(gen: &[GenService], packets: &[GenPacket]) -> Result<(), String> {
        let plan = fixtures::plan(view(gen));
        let rs = render(&plan, CLUSTER_CIDR);
        let mut all = Vec::new();
        for svc in &plan.services {
            for f in &svc.frontends {
                for src in sources(&plan) {
                    all.push(Packet {
                        src,
                        protocol: f.protocol,
                        dst: f.ip,
                        port: f.port,
                    });
                }
            }
        }
        all.extend(packets.iter().map(|g| packet(&plan, g)));
        for hooks in [
            Hooks::installed().map_err(|e| e.to_string())?,
            Hooks::weft_default(),
        ] {
            let sim = Interpreter::new(&rs, &hooks, &[node_ip()]).map_err(|e| e.to_string())?;
            for p in &all {
                if let Some(d) = disagreement(&plan, &sim, p) {
                    return Err(format!("{d}\nhooks: {hooks:#?}\nplan: {plan:#?}"));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            // Shrunk cases become deterministic tests here, not files beside the source.
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn rendered_rules_do_what_the_tracer_says(
            gen in prop::collection::vec(gen_service(), 1..=4),
            packets in prop::collection::vec(gen_packet(), 0..16),
        ) {
            if let Err(e) = check_view(&gen, &packets) {
                return Err(TestCaseError::fail(e));
            }
        }
    }
}
