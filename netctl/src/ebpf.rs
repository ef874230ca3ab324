//! `netctl ebpf`: the node's eBPF service maps in human form (asks the local
//! agent, which reads the pinned maps): where the programs are attached,
//! every frontend with its Service and backends, the session-affinity
//! entries, the north-south connections, and how full each map is.

use crate::agent::{s, show, AgentArgs};
use anyhow::Result;
use serde_json::Value;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct EbpfArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// Print the agent's JSON answer (as `-o json`).
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
}

/// Rows of cells, each column but the last padded to its widest cell.
fn aligned(rows: &[Vec<String>], indent: &str) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; cols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_string();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(s).collect()
}

fn frontend_row(f: &Value) -> Vec<String> {
    let flags = strings(&f["flags"]);
    let backends = strings(&f["backends"]);
    let target = if flags.iter().any(|w| w == "reject") {
        "refused (no endpoints)".to_string()
    } else if flags.iter().any(|w| w == "drop") {
        "dropped (no endpoint for this traffic here)".to_string()
    } else {
        backends.join(", ")
    };
    let mut notes: Vec<String> = flags
        .iter()
        .filter(|w| *w != "reject" && *w != "drop")
        .cloned()
        .collect();
    if let Some(slots) = f["maglevSlots"].as_array() {
        let slots: Vec<String> = slots.iter().map(s).collect();
        if let Some(m) = notes.iter_mut().find(|w| *w == "maglev") {
            *m = format!("maglev slots {}", slots.join("/"));
        }
    }
    if !f["affinity"].is_null() {
        notes.push(format!("affinity {}s", s(&f["affinity"]["timeoutSeconds"])));
    }
    if f["matchesPlan"] == false {
        notes.push(if f["service"].is_null() {
            "no Service wants it".into()
        } else {
            "differs from the plan".into()
        });
    }
    let service = match (f["service"].as_str(), f["kind"].as_str()) {
        (Some(svc), Some(kind)) if !kind.is_empty() => format!("{svc} ({kind})"),
        (Some(svc), _) => svc.to_string(),
        (None, _) => "-".into(),
    };
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" [{}]", notes.join(", "))
    };
    vec![
        s(&f["frontend"]),
        s(&f["scope"]),
        service,
        format!("-> {target}{notes}"),
    ]
}

/// Human form of the agent's `ebpf` answer.
pub fn render(v: &Value) -> String {
    if let Some(e) = v.get("error") {
        return format!("error from the agent: {}\n", s(e));
    }
    let mut out = String::new();
    let attach = &v["attach"];
    out.push_str(&format!(
        "dataplane: {}   maps pinned in {}\n",
        s(&v["dataplane"]),
        s(&v["pins"])
    ));
    out.push_str(&format!(
        "socket programs: {} on cgroup {}\n",
        match strings(&attach["socketPrograms"]) {
            p if p.is_empty() => "none".to_string(),
            p => p.join(", "),
        },
        s(&attach["cgroup"])
    ));
    let missing = strings(&attach["socketProgramsMissing"]);
    if !missing.is_empty() {
        out.push_str(&format!(
            "  NOT ATTACHED (no pinned link): {}\n",
            missing.join(", ")
        ));
    }
    let tc = strings(&attach["tcIngress"]);
    out.push_str(&format!(
        "tc ingress: {}\n",
        if tc.is_empty() {
            "none".to_string()
        } else {
            tc.join(", ")
        }
    ));
    let node = &v["node"];
    if node.is_null() {
        out.push_str("node: not configured yet (no north-south translation)\n");
    } else {
        out.push_str(&format!(
            "node: {} on {}   bridge {}   vxlan {}\n",
            s(&node["address"]),
            s(&node["uplink"]),
            s(&node["bridge"]),
            s(&node["vxlan"])
        ));
    }

    let frontends: Vec<Vec<String>> = v["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(frontend_row)
        .collect();
    out.push_str(&format!("\nFRONTENDS ({})\n", frontends.len()));
    if frontends.is_empty() {
        out.push_str("  none\n");
    }
    out.push_str(&aligned(&frontends, "  "));
    for m in strings(&v["notInMaps"]) {
        out.push_str(&format!("  planned but not in the maps yet: {m}\n"));
    }

    let omitted = |what: &str| v["omitted"][what].as_u64().unwrap_or(0);
    let affinity: Vec<Vec<String>> = v["affinity"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let service = a["service"].as_str().unwrap_or("-").to_string();
            vec![
                service,
                s(&a["client"]),
                format!("-> {}", s(&a["backend"])),
                format!(
                    "used {}s ago{}",
                    s(&a["ageSeconds"]),
                    match a["state"].as_str() {
                        Some("active") => String::new(),
                        Some(other) => format!(", {other}"),
                        None => String::new(),
                    }
                ),
            ]
        })
        .collect();
    out.push_str(&format!("\nAFFINITY ({})\n", affinity.len()));
    if affinity.is_empty() {
        out.push_str("  none\n");
    }
    out.push_str(&aligned(&affinity, "  "));
    if omitted("affinity") > 0 {
        out.push_str(&format!("  ... and {} more\n", omitted("affinity")));
    }

    let conns: Vec<Vec<String>> = v["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let masq = match c["masqueradedAs"].as_str() {
                Some(m) => format!(" (masqueraded as {m})"),
                None => String::new(),
            };
            let mut notes = Vec::new();
            if let Some(svc) = c["service"].as_str() {
                notes.push(svc.to_string());
            }
            if let Some(via) = c["via"].as_str() {
                notes.push(format!("via {via}"));
            }
            if c["entries"] != "both" {
                notes.push(s(&c["entries"]));
            }
            vec![
                s(&c["protocol"]),
                format!(
                    "{} -> {} => {}{masq}",
                    s(&c["client"]),
                    s(&c["frontend"]),
                    s(&c["backend"])
                ),
                format!("[{}]", notes.join(", ")),
            ]
        })
        .collect();
    out.push_str(&format!("\nCONNECTIONS ({}, north-south)\n", conns.len()));
    if conns.is_empty() {
        out.push_str("  none\n");
    }
    out.push_str(&aligned(&conns, "  "));
    if omitted("connections") > 0 {
        out.push_str(&format!("  ... and {} more\n", omitted("connections")));
    }

    let maps: Vec<Vec<String>> = v["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                s(&m["map"]),
                format!("{}/{}", s(&m["entries"]), s(&m["capacity"])),
                s(&m["holds"]),
            ]
        })
        .collect();
    out.push_str("\nMAPS (entries/capacity)\n");
    out.push_str(&aligned(&maps, "  "));
    out
}

pub async fn run(args: &EbpfArgs, out: &mut impl Write) -> Result<bool> {
    let agent = AgentArgs {
        socket: args.agent.socket.clone(),
        output: if args.json {
            Some("json".into())
        } else {
            args.agent.output.clone()
        },
    };
    show(&agent, &serde_json::json!({"op": "ebpf"}), render, out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An answer as the agent's report builds it (weft-agent
    /// dataplane::ebpf::report, whose tests check the JSON itself).
    fn answer() -> Value {
        json!({
            "dataplane": "ebpf",
            "pins": "/sys/fs/bpf/weft/maps-v1",
            "attach": {"cgroup": "/sys/fs/cgroup", "socketPrograms": ["weft_connect4", "weft_sendmsg4", "weft_getpeername4"],
                       "socketProgramsMissing": ["weft_recvmsg4"], "tcIngress": ["eth0", "weft0", "weft.1"]},
            "node": {"address": "198.18.0.11", "uplink": "eth0 (ifindex 2)", "bridge": "weft0 (ifindex 4) 198.18.128.1",
                     "vxlan": "weft.1 (ifindex 3) 198.18.128.0"},
            "frontends": [
                {"frontend": "198.19.0.21:80/TCP", "scope": "socket", "service": "default/empty", "kind": "ClusterIP",
                 "flags": ["reject"], "set": 0, "backends": [], "maglevSlots": null, "affinity": null, "matchesPlan": true},
                {"frontend": "198.19.0.20:80/TCP", "scope": "socket", "service": "default/web", "kind": "ClusterIP",
                 "flags": [], "set": 1, "backends": ["198.18.128.5:8080 (local)", "198.18.129.5:8080"],
                 "maglevSlots": null, "affinity": {"group": 1, "timeoutSeconds": 10800}, "matchesPlan": true},
                {"frontend": "198.18.0.11:30080/TCP", "scope": "external", "service": "default/web", "kind": "NodePort",
                 "flags": ["snat", "maglev"], "set": 2, "backends": ["198.18.128.5:8080 (local)", "198.18.129.5:8080"],
                 "maglevSlots": [511, 510], "affinity": null, "matchesPlan": false},
                {"frontend": "198.19.0.99:80/TCP", "scope": "socket", "service": null, "kind": null,
                 "flags": [], "set": 1, "backends": ["198.18.128.5:8080 (local)"], "maglevSlots": null,
                 "affinity": null, "matchesPlan": false},
            ],
            "notInMaps": ["default/web 198.19.0.20:80/TCP external"],
            "affinity": [
                {"group": 1, "service": "default/web", "client": "netns cookie 4097 (pod default/client-1)",
                 "backend": "198.18.128.5:8080", "ageSeconds": 3, "timeoutSeconds": 10800, "state": "active"},
                {"group": 1, "service": "default/web", "client": "client 198.19.255.9",
                 "backend": "198.18.129.5:8080", "ageSeconds": 11000, "timeoutSeconds": 10800,
                 "state": "expired (a new one is picked)"},
            ],
            "connections": [
                {"protocol": "TCP", "client": "198.19.255.9:40000", "frontend": "198.18.0.11:30080",
                 "backend": "198.18.128.5:8080", "masqueradedAs": "198.18.128.1:40000",
                 "via": "weft0", "service": "default/web", "entries": "both"},
                {"protocol": "TCP", "client": "198.19.255.10:41000", "frontend": "198.18.0.11:30080",
                 "backend": "198.18.129.5:8080", "masqueradedAs": null,
                 "via": null, "service": "default/web", "entries": "reply only"},
            ],
            "omitted": {"affinity": 0, "connections": 7},
            "maps": [
                {"map": "WEFT_SVC", "holds": "frontends", "entries": 8, "capacity": 131072},
                {"map": "WEFT_CT", "holds": "connection entries, two per connection (LRU)", "entries": 3, "capacity": 262144},
            ],
        })
    }

    #[test]
    fn renders_header_and_frontends() {
        let text = render(&answer());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            [
                "dataplane: ebpf   maps pinned in /sys/fs/bpf/weft/maps-v1",
                "socket programs: weft_connect4, weft_sendmsg4, weft_getpeername4 on cgroup /sys/fs/cgroup",
                "  NOT ATTACHED (no pinned link): weft_recvmsg4",
                "tc ingress: eth0, weft0, weft.1",
            ]
        );
        assert!(
            text.contains("node: 198.18.0.11 on eth0 (ifindex 2)   bridge weft0 (ifindex 4) 198.18.128.1   vxlan weft.1 (ifindex 3) 198.18.128.0\n"),
            "{text}"
        );
        let section = text
            .split("FRONTENDS (4)\n")
            .nth(1)
            .and_then(|t| t.split("\n\n").next())
            .unwrap();
        assert_eq!(
            section,
            [
                "  198.19.0.21:80/TCP     socket    default/empty (ClusterIP)  -> refused (no endpoints)",
                "  198.19.0.20:80/TCP     socket    default/web (ClusterIP)    -> 198.18.128.5:8080 (local), 198.18.129.5:8080 [affinity 10800s]",
                "  198.18.0.11:30080/TCP  external  default/web (NodePort)     -> 198.18.128.5:8080 (local), 198.18.129.5:8080 [snat, maglev slots 511/510, differs from the plan]",
                "  198.19.0.99:80/TCP     socket    -                          -> 198.18.128.5:8080 (local) [no Service wants it]",
                "  planned but not in the maps yet: default/web 198.19.0.20:80/TCP external",
            ]
            .join("\n")
        );
    }

    #[test]
    fn renders_affinity_connections_and_maps() {
        let text = render(&answer());
        assert!(
            text.contains(
                "AFFINITY (2)\n  default/web  netns cookie 4097 (pod default/client-1)  -> 198.18.128.5:8080  used 3s ago\n  default/web  client 198.19.255.9                       -> 198.18.129.5:8080  used 11000s ago, expired (a new one is picked)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "CONNECTIONS (2, north-south)\n  TCP  198.19.255.9:40000 -> 198.18.0.11:30080 => 198.18.128.5:8080 (masqueraded as 198.18.128.1:40000)  [default/web, via weft0]\n  TCP  198.19.255.10:41000 -> 198.18.0.11:30080 => 198.18.129.5:8080                                     [default/web, reply only]\n  ... and 7 more\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "MAPS (entries/capacity)\n  WEFT_SVC  8/131072  frontends\n  WEFT_CT   3/262144  connection entries, two per connection (LRU)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn renders_errors_and_empty_maps() {
        assert_eq!(
            render(&json!({"error": "this node runs the iptables dataplane"})),
            "error from the agent: this node runs the iptables dataplane\n"
        );
        let text = render(
            &json!({"dataplane": "ebpf", "pins": "/p", "attach": {}, "node": null,
            "frontends": [], "affinity": [], "connections": [], "maps": []}),
        );
        assert!(text.contains("socket programs: none on cgroup"), "{text}");
        assert!(text.contains("node: not configured yet"), "{text}");
        assert!(text.contains("FRONTENDS (0)\n  none\n"), "{text}");
        assert!(
            text.contains("CONNECTIONS (0, north-south)\n  none\n"),
            "{text}"
        );
    }

    #[test]
    fn json_flag_parses() {
        use clap::Parser;
        let cli =
            crate::Cli::try_parse_from(["netctl", "ebpf", "--socket", "/tmp/a.sock", "--json"])
                .unwrap();
        let crate::Command::Ebpf(a) = cli.command else {
            panic!("not ebpf")
        };
        assert!(a.json);
        assert_eq!(a.agent.socket, std::path::PathBuf::from("/tmp/a.sock"));
        assert!(crate::Cli::try_parse_from(["netctl", "ebpf", "--json", "-o", "json"]).is_err());
    }
}
