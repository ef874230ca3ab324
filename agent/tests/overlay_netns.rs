//! The rtnetlink overlay against a real kernel, inside a network namespace
//! this test creates (and removes, even on failure). Needs root; otherwise it
//! says "skipped" and why.

use std::process::Command;
use weft_agent::overlay::netlink::NetlinkLinks;
use weft_agent::overlay::{reconcile, vtep_mac, Desired, Links, Op, Peer};

mod common;
use common::Netns;

fn desired(peers: usize) -> Desired {
    Desired {
        subnet: "198.18.128.0/24".parse().unwrap(),
        gateway: "198.18.128.1/24".parse().unwrap(),
        mtu: 1450,
        local_ip: "198.18.0.11".parse().unwrap(),
        vtep_addr: "198.18.128.0/32".parse().unwrap(),
        vtep_mac: vtep_mac("node-1"),
        bridge_mac: weft_agent::overlay::bridge_mac("node-1"),
        peers: (0..peers)
            .map(|i| Peer {
                node: format!("node-{}", i + 2),
                subnet: format!("198.18.{}.0/24", 129 + i).parse().unwrap(),
                vtep_ip: format!("198.18.0.{}", 12 + i).parse().unwrap(),
                vtep_mac: vtep_mac(&format!("node-{}", i + 2)),
            })
            .collect(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn overlay_is_programmed_repaired_and_stable() {
    let ns = match Netns::create("ov-a") {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot create a network namespace ({why})");
            return;
        }
    };
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    let (first, second) = ns.run(|| {
        rt().block_on(async {
            let links = NetlinkLinks::new().unwrap();
            let want = desired(2);
            let first = reconcile(&links, &want).await.unwrap();
            let second = reconcile(&links, &want).await.unwrap();
            (first, second)
        })
    });
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.applied.len(), 4 + 2 * 3, "{:?}", first.applied);
    assert!(
        second.applied.is_empty(),
        "a second pass changes nothing: {:?}",
        second.applied
    );

    let details = ns.exec(&["ip", "-d", "link", "show", "weft.1"]);
    assert!(details.contains("vxlan id 1"), "{details}");
    assert!(details.contains("dstport 8472"), "{details}");
    assert!(details.contains("nolearning"), "{details}");
    assert!(details.contains("mtu 1450"), "{details}");
    let routes = ns.exec(&["ip", "route", "show", "dev", "weft.1"]);
    assert!(
        routes.contains("198.18.129.0/24 via 198.18.129.0") && routes.contains("onlink"),
        "{routes}"
    );
    let neigh = ns.exec(&["ip", "neigh", "show", "dev", "weft.1"]);
    assert!(
        neigh.contains("198.18.129.0 lladdr") && neigh.contains("PERMANENT"),
        "{neigh}"
    );
    let fdb = ns.exec(&["bridge", "fdb", "show", "dev", "weft.1"]);
    assert!(fdb.contains("dst 198.18.0.12"), "{fdb}");
    let addr = ns.exec(&["ip", "-4", "addr", "show", "dev", "weft0"]);
    assert!(addr.contains("198.18.128.1/24"), "{addr}");
    let addr = ns.exec(&["ip", "-4", "addr", "show", "dev", "weft.1"]);
    assert!(addr.contains("198.18.128.0/32"), "the VTEP address: {addr}");

    // hand-made damage is repaired with exactly the missing pieces
    ns.exec(&["ip", "route", "del", "198.18.130.0/24", "dev", "weft.1"]);
    let mac = weft_agent::overlay::format_mac(&vtep_mac("node-2"));
    ns.exec(&[
        "bridge",
        "fdb",
        "del",
        &mac,
        "dev",
        "weft.1",
        "dst",
        "198.18.0.12",
    ]);
    let repair = ns.run(|| {
        rt().block_on(async {
            reconcile(&NetlinkLinks::new().unwrap(), &desired(2))
                .await
                .unwrap()
        })
    });
    assert!(repair.errors.is_empty(), "{:?}", repair.errors);
    assert_eq!(repair.applied.len(), 2, "{:?}", repair.applied);

    // a deleted VXLAN device comes back with every entry; a departed peer's entries go
    ns.exec(&["ip", "link", "del", "weft.1"]);
    let (back, shrink, observed) = ns.run(|| {
        rt().block_on(async {
            let links = NetlinkLinks::new().unwrap();
            let back = reconcile(&links, &desired(2)).await.unwrap();
            let shrink = reconcile(&links, &desired(1)).await.unwrap();
            (back, shrink, links.observe().await.unwrap())
        })
    });
    assert_eq!(back.applied.len(), 2 + 2 * 3, "{:?}", back.applied);
    assert!(shrink
        .applied
        .iter()
        .all(|o| matches!(o, Op::DelRoute(_) | Op::DelNeighbour(_) | Op::DelFdb(_))));
    assert_eq!(shrink.applied.len(), 3, "{:?}", shrink.applied);
    assert_eq!(
        (
            observed.routes.len(),
            observed.neighbours.len(),
            observed.fdb.len()
        ),
        (1, 1, 1)
    );
}

fn node_desired(me: usize, nodes: usize) -> Desired {
    let name = |i: usize| format!("node-{i}");
    Desired {
        subnet: format!("198.18.{}.0/24", 127 + me).parse().unwrap(),
        gateway: format!("198.18.{}.1/24", 127 + me).parse().unwrap(),
        mtu: 1450,
        local_ip: format!("198.18.0.{}", 10 + me).parse().unwrap(),
        vtep_addr: format!("198.18.{}.0/32", 127 + me).parse().unwrap(),
        vtep_mac: vtep_mac(&name(me)),
        bridge_mac: weft_agent::overlay::bridge_mac(&name(me)),
        peers: (1..=nodes)
            .filter(|i| *i != me)
            .map(|i| Peer {
                node: name(i),
                subnet: format!("198.18.{}.0/24", 127 + i).parse().unwrap(),
                vtep_ip: format!("198.18.0.{}", 10 + i).parse().unwrap(),
                vtep_mac: vtep_mac(&name(i)),
            })
            .collect(),
    }
}

#[test]
fn two_nodes_reach_each_other_over_vxlan() {
    let (a, b) = match (Netns::create("ov-n1"), Netns::create("ov-n2")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(why), _) | (_, Err(why)) => {
            eprintln!("skipped: cannot create a network namespace ({why})");
            return;
        }
    };
    // underlay: a veth pair between the two nodes
    let out = Command::new("ip")
        .args([
            "link", "add", "ul0", "netns", &a.0, "type", "veth", "peer", "name", "ul0", "netns",
            &b.0,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (ns, ip) in [(&a, "198.18.0.11/24"), (&b, "198.18.0.12/24")] {
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "addr", "add", ip, "dev", "ul0"]);
        ns.exec(&["ip", "link", "set", "ul0", "up"]);
    }
    for (ns, me) in [(&a, 1usize), (&b, 2usize)] {
        let out = ns.run(move || {
            rt().block_on(async {
                reconcile(&NetlinkLinks::new().unwrap(), &node_desired(me, 2))
                    .await
                    .unwrap()
            })
        });
        assert!(out.errors.is_empty(), "{:?}", out.errors);
    }
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.0,
            "ping",
            "-c",
            "2",
            "-W",
            "2",
            "198.18.129.1",
        ])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "node-1 -> node-2's gateway over VXLAN: {}{}\nroutes: {}\nneigh: {}\nfdb: {}\nlinks: {}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr),
        a.exec(&["ip", "route"]),
        a.exec(&["ip", "neigh"]),
        a.exec(&["bridge", "fdb", "show", "dev", "weft.1"]),
        b.exec(&["ip", "-d", "link"]),
    );
}
