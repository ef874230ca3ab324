//! `weft-workload`: the process the e2e harness runs inside pods (and on
//! nodes and external hosts) so tests can see who answered and from where.
//!
//! ```text
//! weft-workload --name NAME [--http 8080] [--udp 9090]
//! ```
//!
//! HTTP/1.1 on `--http` (one thread per connection, `Connection: close`):
//! - `GET /hostname`  → NAME
//! - `GET /clientip`  → the peer's IP address as this process sees it
//! - `GET /bytes/N`   → a body of N bytes (`0123456789` repeated)
//! - `GET /stream`    → an endless body (chunks of 16 KiB every 5 ms) until the client goes
//!
//! UDP echo on `--udp`: each datagram is answered with `NAME:` followed by
//! the received payload, so a client checks both who answered and that the
//! whole datagram arrived.
//!
//! DNS on `--dns` (UDP; the external host runs it as the cluster's upstream
//! server): `example.test` and names below it answer A with the address
//! the query arrived on, AAAA with no records; anything else is NXDOMAIN.
//! Every answer has TTL 60. Malformed queries are ignored.
//!
//! Only std: it starts in a few milliseconds and has no runtime to tune.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

fn usage() -> ! {
    eprintln!("usage: weft-workload --name NAME [--http PORT] [--udp PORT] [--dns PORT]");
    std::process::exit(2);
}

fn main() {
    let mut name = None;
    let mut http = None;
    let mut udp = None;
    let mut dns = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--name" => name = Some(value()),
            "--http" => http = Some(value().parse::<u16>().unwrap_or_else(|_| usage())),
            "--udp" => udp = Some(value().parse::<u16>().unwrap_or_else(|_| usage())),
            "--dns" => dns = Some(value().parse::<u16>().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    let Some(name) = name else { usage() };
    if http.is_none() && udp.is_none() {
        usage();
    }
    let mut threads = Vec::new();
    if let Some(port) = dns {
        let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
            eprintln!("weft-workload: binding udp/{port} (dns): {e}");
            std::process::exit(1)
        });
        threads.push(std::thread::spawn(move || dns_server(sock)));
        eprintln!("weft-workload {name}: dns on {port}");
    }
    if let Some(port) = udp {
        let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
            eprintln!("weft-workload: binding udp/{port}: {e}");
            std::process::exit(1)
        });
        let n = name.clone();
        threads.push(std::thread::spawn(move || udp_echo(sock, &n)));
        eprintln!("weft-workload {name}: udp echo on {port}");
    }
    if let Some(port) = http {
        let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
            eprintln!("weft-workload: binding tcp/{port}: {e}");
            std::process::exit(1)
        });
        let n = name.clone();
        threads.push(std::thread::spawn(move || serve_http(listener, n)));
        eprintln!("weft-workload {name}: http on {port}");
    }
    for t in threads {
        let _ = t.join();
    }
}

fn udp_echo(sock: UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = Vec::with_capacity(name.len() + 1 + n);
        reply.extend_from_slice(name.as_bytes());
        reply.push(b':');
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = sock.send_to(&reply, peer) {
            eprintln!("weft-workload: udp reply to {peer}: {e}");
        }
    }
}

fn dns_server(sock: UdpSocket) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        // The address the query was sent to: the one the host answers with.
        let me = match peer {
            std::net::SocketAddr::V4(_) => local_v4_towards(peer),
            _ => None,
        };
        if let Some(reply) = dns_answer(&buf[..n], me) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

/// The local IPv4 address the kernel picks to reach `peer`.
fn local_v4_towards(peer: std::net::SocketAddr) -> Option<[u8; 4]> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(peer).ok()?;
    match s.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(a) => Some(a.octets()),
        _ => None,
    }
}

/// A response to one DNS query, or `None` for anything malformed.
fn dns_answer(q: &[u8], addr: Option<[u8; 4]>) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    q.get(..question_end)?;
    let name = labels.join(".");
    let ours = name == "example.test" || name.ends_with(".example.test");
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&q[..2]);
    // QR, RD copied, RA; rcode 3 (NXDOMAIN) unless the name is ours.
    out.push(0x80 | (q[2] & 0x01));
    out.push(0x80 | if ours { 0 } else { 3 });
    let answer = ours && qtype == 1 && addr.is_some();
    out.extend_from_slice(&[0, 1, 0, answer as u8, 0, 0, 0, 0]);
    out.extend_from_slice(&q[12..question_end]);
    if let (true, Some(a)) = (answer, addr) {
        // Name: pointer to the question; A IN, TTL 60, 4 bytes.
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&a);
    }
    Some(out)
}

fn serve_http(listener: TcpListener, name: String) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(conn, &name) {
                eprintln!("weft-workload: http: {e}");
            }
        });
    }
}

fn handle(conn: TcpStream, name: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let peer = conn.peer_addr()?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Skip the headers.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = conn;
    if method != "GET" {
        return respond(&mut out, "405 Method Not Allowed", b"GET only\n");
    }
    if path == "/hostname" {
        respond(&mut out, "200 OK", name.as_bytes())
    } else if path == "/clientip" {
        respond(&mut out, "200 OK", peer.ip().to_string().as_bytes())
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<usize>() else {
            return respond(&mut out, "400 Bad Request", b"bad length\n");
        };
        let body: Vec<u8> = b"0123456789".iter().copied().cycle().take(n).collect();
        respond(&mut out, "200 OK", &body)
    } else if path == "/stream" {
        out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")?;
        let chunk = vec![b'x'; 16 * 1024];
        loop {
            out.write_all(&chunk)?;
            std::thread::sleep(Duration::from_millis(5));
        }
    } else {
        respond(&mut out, "404 Not Found", b"not found\n")
    }
}

fn respond(out: &mut TcpStream, status: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body)?;
    out.flush()
}
