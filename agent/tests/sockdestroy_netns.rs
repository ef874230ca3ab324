//! `destroy_udp_to_in` against the real kernel: inside a network namespace
//! this test creates (removed even on failure), exactly the UDP sockets
//! connected to a target are destroyed, their owners see ECONNABORTED, and
//! every other socket (other peer, other port, unconnected, other
//! namespace) keeps working. Needs root; otherwise it says "skipped" and why.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weft_agent::dataplane::sockdestroy::{destroy_udp_to, destroy_udp_to_in};

mod common;
use common::Netns;

const DEAD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 50);
const LIVE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 51);
const PORT: u16 = 5353;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A namespace where DEAD is on a veth whose peer ignores it (sends succeed
/// and vanish, no ICMP comes back) and LIVE is a local address.
fn netns(tag: &str) -> Netns {
    let ns = Netns::create(tag).unwrap_or_else(|why| panic!("creating a netns: {why}"));
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    ns.exec(&[
        "ip", "link", "add", "sd0", "type", "veth", "peer", "name", "sd1",
    ]);
    ns.exec(&["ip", "link", "set", "sd0", "up"]);
    ns.exec(&["ip", "link", "set", "sd1", "up"]);
    ns.exec(&["ip", "addr", "add", "198.18.0.1/24", "dev", "sd0"]);
    // A failed ARP would report EHOSTUNREACH to the senders.
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "198.18.0.50",
        "lladdr",
        "02:00:00:00:00:50",
        "dev",
        "sd0",
        "nud",
        "permanent",
    ]);
    ns.exec(&["ip", "addr", "add", "198.18.0.51/32", "dev", "lo"]);
    ns
}

fn path(ns: &Netns) -> PathBuf {
    PathBuf::from(format!("/run/netns/{}", ns.0))
}

/// UDP sockets made inside `ns`, each connected to its peer.
fn connected(ns: &Netns, peers: &[(Ipv4Addr, u16)]) -> Vec<UdpSocket> {
    let peers = peers.to_vec();
    ns.run(move || {
        peers
            .iter()
            .map(|p| {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                s.connect(p).unwrap();
                s
            })
            .collect()
    })
}

fn os_error(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

/// The next recv on a socket nobody should have written to: its pending
/// error, or WouldBlock.
fn recv_now(s: &UdpSocket) -> std::io::Result<usize> {
    s.set_nonblocking(true).unwrap();
    let r = s.recv(&mut [0; 64]);
    s.set_nonblocking(false).unwrap();
    r
}

fn datagram(s: &UdpSocket) -> Vec<u8> {
    let mut buf = [0; 64];
    let n = s.recv(&mut buf).unwrap();
    buf[..n].to_vec()
}

#[test]
fn destroys_exactly_the_sockets_connected_to_a_target() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = netns("sd");
    let other = netns("sdo");

    let server = ns.run(|| UdpSocket::bind((LIVE, PORT)).unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut s = connected(
        &ns,
        &[(DEAD, PORT), (DEAD, PORT), (LIVE, PORT), (DEAD, 5354)],
    );
    let (dead_other_port, live, dead_b, dead_a) = (
        s.pop().unwrap(),
        s.pop().unwrap(),
        s.pop().unwrap(),
        s.pop().unwrap(),
    );
    let mut elsewhere = connected(&other, &[(DEAD, PORT)]);
    let elsewhere = elsewhere.pop().unwrap();

    // The owner of dead_a waits for an answer, as a DNS client would.
    let waiter = dead_a.try_clone().unwrap();
    waiter
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let blocked = std::thread::spawn(move || {
        let start = Instant::now();
        (waiter.recv(&mut [0; 64]), start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));

    let n = destroy_udp_to_in(&path(&ns), &[(DEAD, PORT)]).unwrap();
    assert_eq!(n, 2, "the two sockets connected to {DEAD}:{PORT}");

    // The blocked recv is woken with ECONNABORTED, well before its timeout.
    let (r, waited) = blocked.join().unwrap();
    let e = r.expect_err("recv on a destroyed socket");
    assert_eq!(os_error(&e), libc::ECONNABORTED, "{e}");
    assert!(waited < Duration::from_secs(5), "woken after {waited:?}");

    // The other destroyed socket: its next recv reports ECONNABORTED; it is
    // no longer connected, so a send fails until the owner reconnects.
    let e = recv_now(&dead_b).expect_err("recv on a destroyed socket");
    assert_eq!(os_error(&e), libc::ECONNABORTED, "{e}");
    let e = dead_b.send(b"q").expect_err("send on a destroyed socket");
    assert_eq!(os_error(&e), libc::EDESTADDRREQ, "{e}");
    assert_eq!(
        dead_b.peer_addr().unwrap_err().kind(),
        ErrorKind::NotConnected
    );
    dead_b.connect((LIVE, PORT)).unwrap();
    dead_b.send(b"again").unwrap();
    assert_eq!(datagram(&server), b"again");

    // Same address, other port: untouched.
    assert_eq!(
        recv_now(&dead_other_port).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(
        dead_other_port.peer_addr().unwrap(),
        SocketAddr::from((DEAD, 5354))
    );
    dead_other_port.send(b"q").unwrap();

    // Connected to a live backend: untouched, and it still talks to it.
    assert_eq!(live.peer_addr().unwrap(), SocketAddr::from((LIVE, PORT)));
    live.send(b"still here").unwrap();
    assert_eq!(datagram(&server), b"still here");
    assert!(live.take_error().unwrap().is_none());

    // Another namespace's socket to the same target: untouched.
    assert!(elsewhere.take_error().unwrap().is_none());
    assert_eq!(
        elsewhere.peer_addr().unwrap(),
        SocketAddr::from((DEAD, PORT))
    );
    elsewhere.send(b"q").unwrap();

    // Nothing left to destroy.
    assert_eq!(destroy_udp_to_in(&path(&ns), &[(DEAD, PORT)]).unwrap(), 0);
}

#[test]
fn targets_matching_nothing_destroy_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let ns = netns("sd0");
    let sockets = connected(&ns, &[(DEAD, PORT), (LIVE, PORT)]);
    let _server = ns.run(|| UdpSocket::bind((LIVE, PORT)).unwrap());

    // Near misses only: other address, other port, and 0.0.0.0:0, the
    // "peer" every unconnected socket (the server) reports.
    let miss = [
        (Ipv4Addr::new(198, 18, 0, 52), PORT),
        (DEAD, PORT + 1),
        (Ipv4Addr::UNSPECIFIED, 0),
    ];
    assert_eq!(destroy_udp_to_in(&path(&ns), &miss).unwrap(), 0);
    // The calling-thread variant, run on a thread inside the namespace.
    assert_eq!(ns.run(move || destroy_udp_to(&miss).unwrap()), 0);

    for s in &sockets {
        assert!(s.take_error().unwrap().is_none());
        assert!(s.peer_addr().is_ok());
        s.send(b"q").unwrap();
    }
}
