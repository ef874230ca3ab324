//! Destroys connected UDP sockets whose peer is a removed Service backend,
//! one network namespace at a time, over `NETLINK_SOCK_DIAG`.
//!
//! Why: the eBPF dataplane balances at the socket, not per packet:
//! cgroup/connect4 rewrites a Service address to a backend once, when the
//! application calls connect(). A connected UDP socket keeps that backend as
//! its peer for as long as it lives, and there is no NAT state the agent
//! could flush (the iptables dataplane deletes conntrack entries instead).
//! When the backend goes away, such a client keeps sending into the void:
//! UDP has no handshake to fail, and a vanished pod IP often sends no ICMP
//! error either. TCP is not touched here: a TCP connection to a dead backend
//! fails by itself (reset or retransmission timeout) and the application
//! reconnects, which picks a live backend.
//!
//! Why userspace `SOCK_DESTROY`, per network namespace: a socket belongs to
//! the network namespace it was created in, and a sock_diag netlink socket
//! sees (and may destroy) only the sockets of its own namespace. Every pod
//! has its own, and the agent knows their paths from CNI (`/proc/PID/ns/net`,
//! `/run/netns/NAME`), so it calls [`destroy_udp_to_in`] for each pod
//! namespace and [`destroy_udp_to`] for its own (host-network clients). It
//! needs `CAP_NET_ADMIN` there and a kernel with `CONFIG_INET_DIAG_DESTROY`
//! and `CONFIG_INET_UDP_DIAG`.
//!
//! What the application sees: the kernel (`udp_abort`) sets the socket's
//! error to `ECONNABORTED`, wakes its waiters and disconnects it. A blocked
//! or the next `recv` (and `SO_ERROR`, `poll`'s `POLLERR`) reports
//! `ECONNABORTED`; a `send` on the now unconnected socket fails with
//! `EDESTADDRREQ`. Either way the application learns and reconnects, and
//! that connect() is balanced again to a live backend.
//!
//! Only `AF_INET` sockets are considered: an `AF_INET6` socket connected to
//! a v4-mapped address is listed by the `AF_INET6` dump, which is not done.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::debug;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `struct inet_diag_sockid`: sport, dport (network order), src[4], dst[4]
/// (network order), if, cookie[2] (host order).
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, id.
const REQ_V2_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, id, expires,
/// rqueue, wqueue, uid, inode.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// Every TCP_* state bit: UDP sockets are TCP_ESTABLISHED when connected,
/// TCP_CLOSE otherwise.
const ALL_STATES: u32 = u32::MAX;
const DUMP_SEQ: u32 = 1;
/// A dump datagram is at most ~32 KiB (the kernel sizes it to the reader's
/// buffer); larger still is reported rather than silently cut.
const RECV_BUF: usize = 64 * 1024;
/// The kernel always answers; this only bounds a wait that should not happen.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

const DUMP: &str = "SOCK_DIAG_BY_FAMILY dump";
const DESTROY: &str = "SOCK_DESTROY";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{call} on a NETLINK_SOCK_DIAG socket: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("opening network namespace {}: {source}", path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {} (setns): {source}", path.display())]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting a thread for network namespace {}: {source}", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused {request}: {source}")]
    Netlink {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed reply to {request}: {reason}")]
    Malformed {
        request: &'static str,
        #[source]
        reason: Malformed,
    },
    /// Some matching sockets could not be destroyed; the others were.
    #[error(
        "SOCK_DESTROY failed for {} UDP socket(s), {destroyed} destroyed; first: {}",
        .failures.len(),
        .failures.first().map_or(String::new(), |f| f.to_string())
    )]
    Destroy {
        destroyed: usize,
        failures: Vec<DestroyFailure>,
    },
}

/// One socket `SOCK_DESTROY` failed for.
#[derive(Debug, thiserror::Error)]
#[error("{local} -> {remote} (cookie {cookie:#x}): {source}")]
pub struct DestroyFailure {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub cookie: u64,
    #[source]
    pub source: io::Error,
}

/// What is wrong with a netlink reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("{len} trailing bytes, shorter than a netlink header")]
    Truncated { len: usize },
    #[error("nlmsg_len {len} with {remaining} bytes left")]
    BadLength { len: u32, remaining: usize },
    #[error("message type {ty}: {len} payload bytes, need {need}")]
    ShortPayload { ty: u16, len: usize, need: usize },
    #[error("unexpected message type {ty}")]
    UnexpectedType { ty: u16 },
    #[error("sequence {got}, expected {want}")]
    UnexpectedSeq { want: u32, got: u32 },
    #[error("datagram of {len} bytes exceeds the {}-byte buffer", RECV_BUF)]
    Oversized { len: usize },
    #[error("no acknowledgement")]
    NoAck,
}

/// One socket from the dump: its addresses and the kernel's id of it,
/// echoed verbatim in `SOCK_DESTROY`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DiagSocket {
    local: SocketAddrV4,
    remote: SocketAddrV4,
    cookie: u64,
    id: [u8; SOCKID_LEN],
}

/// One reply datagram of the dump.
#[derive(Debug, Default, PartialEq, Eq)]
struct DumpPart {
    sockets: Vec<DiagSocket>,
    done: bool,
}

/// Destroy, in the calling thread's network namespace, every connected IPv4
/// UDP socket whose peer is one of `targets`; how many were destroyed.
/// Sockets that close between the dump and the destroy are not counted and
/// are not an error.
pub fn destroy_udp_to(targets: &[(Ipv4Addr, u16)]) -> Result<usize, Error> {
    if targets.is_empty() {
        return Ok(0);
    }
    let mut nl = Netlink::open()?;
    let sockets = nl.dump_udp(common_port(targets))?;
    let matching = sockets.iter().filter(|s| {
        // Unconnected sockets report 0.0.0.0:0; never match them, even
        // if a caller passes that as a target.
        !s.remote.ip().is_unspecified()
            && s.remote.port() != 0
            && targets.contains(&(*s.remote.ip(), s.remote.port()))
    });
    let (mut destroyed, mut failures) = (0, Vec::new());
    for (seq, s) in (DUMP_SEQ + 1..).zip(matching) {
        match nl.destroy(seq, s) {
            Ok(()) => {
                debug!(local = %s.local, remote = %s.remote, cookie = s.cookie, "destroyed UDP socket");
                destroyed += 1;
            }
            // ESTALE: the 4-tuple now names another socket (a new
            // connect() went through the hook, so not to this backend).
            Err(Error::Netlink { source, .. })
                if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) =>
            {
                debug!(local = %s.local, remote = %s.remote, "UDP socket closed before destroy");
            }
            Err(Error::Netlink { source, .. }) => {
                // Missing privilege or kernel support fails every socket alike.
                let stop = matches!(source.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP));
                failures.push(DestroyFailure {
                    local: s.local,
                    remote: s.remote,
                    cookie: s.cookie,
                    source,
                });
                if stop {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    if failures.is_empty() {
        Ok(destroyed)
    } else {
        Err(Error::Destroy {
            destroyed,
            failures,
        })
    }
}

/// [`destroy_udp_to`] inside the network namespace at `netns`
/// (`/proc/PID/ns/net`, `/run/netns/NAME`). A dedicated short-lived thread
/// enters it and exits, so no caller thread (a pooled one above all) ever
/// changes namespace.
pub fn destroy_udp_to_in(netns: &Path, targets: &[(Ipv4Addr, u16)]) -> Result<usize, Error> {
    if targets.is_empty() {
        return Ok(0);
    }
    let file = std::fs::File::open(netns).map_err(|source| Error::OpenNetns {
        path: netns.to_path_buf(),
        source,
    })?;
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("weft-sockdestroy".into())
            .spawn_scoped(scope, || {
                // SAFETY: a valid namespace fd; setns changes only this
                // thread, which ends when the closure returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::EnterNetns {
                        path: netns.to_path_buf(),
                        source: io::Error::last_os_error(),
                    });
                }
                destroy_udp_to(targets)
            })
            .map_err(|source| Error::Thread {
                path: netns.to_path_buf(),
                source,
            })?;
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The destination port every target shares, if any: the UDP dump can
/// filter on it in the kernel.
fn common_port(targets: &[(Ipv4Addr, u16)]) -> Option<u16> {
    let port = targets.first()?.1;
    targets.iter().all(|t| t.1 == port).then_some(port)
}

fn header(buf: &mut Vec<u8>, len: usize, ty: u16, flags: u16, seq: u32) {
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
}

fn req_v2(buf: &mut Vec<u8>, id: &[u8; SOCKID_LEN]) {
    buf.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_UDP as u8, 0, 0]);
    buf.extend_from_slice(&ALL_STATES.to_ne_bytes());
    buf.extend_from_slice(id);
}

/// Dump every IPv4 UDP socket; with `dport`, only those connected to that
/// port (the UDP dump honours a non-zero `idiag_dport`).
fn dump_request(seq: u32, dport: Option<u16>) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_V2_LEN;
    let mut buf = Vec::with_capacity(len);
    header(
        &mut buf,
        len,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
    );
    let mut id = [0; SOCKID_LEN];
    id[2..4].copy_from_slice(&dport.unwrap_or(0).to_be_bytes());
    req_v2(&mut buf, &id);
    buf
}

fn destroy_request(seq: u32, socket: &DiagSocket) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_V2_LEN;
    let mut buf = Vec::with_capacity(len);
    header(&mut buf, len, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq);
    req_v2(&mut buf, &socket.id);
    buf
}

struct Message<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Split a datagram into netlink messages, every length checked.
fn messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, Malformed> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(Malformed::Truncated { len: buf.len() });
        }
        let len = u32_at(buf, 0);
        let bad = Malformed::BadLength {
            len,
            remaining: buf.len(),
        };
        let len_us = usize::try_from(len).map_err(|_| bad.clone())?;
        if len_us < NLMSG_HDRLEN || len_us > buf.len() {
            return Err(bad);
        }
        out.push(Message {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32_at(buf, 8),
            payload: &buf[NLMSG_HDRLEN..len_us],
        });
        // Messages are 4-byte aligned; the last one may omit its padding.
        buf = &buf[len_us.next_multiple_of(4).min(buf.len())..];
    }
    Ok(out)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn need(m: &Message<'_>, need: usize) -> Result<(), Malformed> {
    if m.payload.len() < need {
        return Err(Malformed::ShortPayload {
            ty: m.ty,
            len: m.payload.len(),
            need,
        });
    }
    Ok(())
}

fn check_seq(m: &Message<'_>, want: u32) -> Result<(), Malformed> {
    if m.seq != want {
        return Err(Malformed::UnexpectedSeq { want, got: m.seq });
    }
    Ok(())
}

/// The errno of an `NLMSG_ERROR` or `NLMSG_DONE` payload (0: none).
fn errno(m: &Message<'_>) -> Result<i32, Malformed> {
    need(m, 4)?;
    let code = i32::from_ne_bytes([m.payload[0], m.payload[1], m.payload[2], m.payload[3]]);
    Ok(code.saturating_neg().max(0))
}

fn parse_dump(buf: &[u8], seq: u32) -> Result<DumpPart, Error> {
    let malformed = |reason| Error::Malformed {
        request: DUMP,
        reason,
    };
    let mut part = DumpPart::default();
    for m in messages(buf).map_err(malformed)? {
        check_seq(&m, seq).map_err(malformed)?;
        match m.ty {
            NLMSG_NOOP => {}
            NLMSG_DONE => {
                // Newer kernels put the dump's own error here.
                let code = if m.payload.is_empty() {
                    0
                } else {
                    errno(&m).map_err(malformed)?
                };
                if code != 0 {
                    return Err(Error::Netlink {
                        request: DUMP,
                        source: io::Error::from_raw_os_error(code),
                    });
                }
                part.done = true;
                break;
            }
            NLMSG_ERROR => {
                let code = errno(&m).map_err(malformed)?;
                if code == 0 {
                    // An acknowledgement: a dump sends none.
                    return Err(malformed(Malformed::UnexpectedType { ty: m.ty }));
                }
                return Err(Error::Netlink {
                    request: DUMP,
                    source: io::Error::from_raw_os_error(code),
                });
            }
            SOCK_DIAG_BY_FAMILY => {
                need(&m, DIAG_MSG_LEN).map_err(malformed)?;
                if let Some(s) = diag_socket(m.payload) {
                    part.sockets.push(s);
                }
            }
            ty => return Err(malformed(Malformed::UnexpectedType { ty })),
        }
    }
    Ok(part)
}

/// An `inet_diag_msg` of at least [`DIAG_MSG_LEN`] bytes; None unless IPv4.
fn diag_socket(p: &[u8]) -> Option<DiagSocket> {
    if p[0] != libc::AF_INET as u8 {
        return None;
    }
    let mut id = [0; SOCKID_LEN];
    id.copy_from_slice(&p[4..4 + SOCKID_LEN]);
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let addr = |at: usize| Ipv4Addr::new(id[at], id[at + 1], id[at + 2], id[at + 3]);
    Some(DiagSocket {
        local: SocketAddrV4::new(addr(4), port(0)),
        remote: SocketAddrV4::new(addr(20), port(2)),
        cookie: u64::from(u32_at(&id, 40)) | (u64::from(u32_at(&id, 44)) << 32),
        id,
    })
}

/// The acknowledgement of request `seq`: Ok, or the kernel's errno as
/// [`Error::Netlink`].
fn parse_ack(buf: &[u8], seq: u32) -> Result<(), Error> {
    let malformed = |reason| Error::Malformed {
        request: DESTROY,
        reason,
    };
    for m in messages(buf).map_err(malformed)? {
        check_seq(&m, seq).map_err(malformed)?;
        match m.ty {
            NLMSG_NOOP => {}
            NLMSG_ERROR => {
                return match errno(&m).map_err(malformed)? {
                    0 => Ok(()),
                    code => Err(Error::Netlink {
                        request: DESTROY,
                        source: io::Error::from_raw_os_error(code),
                    }),
                };
            }
            ty => return Err(malformed(Malformed::UnexpectedType { ty })),
        }
    }
    Err(malformed(Malformed::NoAck))
}

/// A `NETLINK_SOCK_DIAG` socket in the namespace of the thread that opened it.
struct Netlink {
    fd: OwnedFd,
    buf: Vec<u8>,
}

fn syscall(call: &'static str) -> Error {
    Error::Syscall {
        call,
        source: io::Error::last_os_error(),
    }
}

impl Netlink {
    fn open() -> Result<Netlink, Error> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(syscall("socket"));
        }
        // SAFETY: fd was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: a valid fd and a timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(syscall("setsockopt(SO_RCVTIMEO)"));
        }
        Ok(Netlink {
            fd,
            buf: vec![0; RECV_BUF],
        })
    }

    fn send(&self, msg: &[u8]) -> Result<(), Error> {
        // SAFETY: zeroed sockaddr_nl is valid; pid 0 addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: msg and kernel outlive the call; lengths match them.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&kernel as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n < 0 {
                return Err(syscall("sendto"));
            }
            if n as usize != msg.len() {
                return Err(Error::Syscall {
                    call: "sendto",
                    source: io::Error::new(io::ErrorKind::WriteZero, "short netlink send"),
                });
            }
            return Ok(());
        }
    }

    /// One datagram; `request` names what it answers, for a too large one.
    fn recv(&mut self, request: &'static str) -> Result<&[u8], Error> {
        loop {
            // SAFETY: buf is valid for its length; MSG_TRUNC makes the
            // return value the datagram's real length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n < 0 {
                return Err(syscall("recv"));
            }
            let n = n as usize;
            if n > self.buf.len() {
                return Err(Error::Malformed {
                    request,
                    reason: Malformed::Oversized { len: n },
                });
            }
            return Ok(&self.buf[..n]);
        }
    }

    fn dump_udp(&mut self, dport: Option<u16>) -> Result<Vec<DiagSocket>, Error> {
        self.send(&dump_request(DUMP_SEQ, dport))?;
        let mut sockets = Vec::new();
        loop {
            let part = parse_dump(self.recv(DUMP)?, DUMP_SEQ)?;
            sockets.extend(part.sockets);
            if part.done {
                return Ok(sockets);
            }
        }
    }

    fn destroy(&mut self, seq: u32, socket: &DiagSocket) -> Result<(), Error> {
        self.send(&destroy_request(seq, socket))?;
        parse_ack(self.recv(DESTROY)?, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        header(&mut buf, NLMSG_HDRLEN + payload.len(), ty, 0, seq);
        buf.extend_from_slice(payload);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
        buf
    }

    /// An `inet_diag_msg` as the kernel writes it.
    fn diag(family: u8, local: SocketAddrV4, remote: SocketAddrV4, cookie: u64) -> Vec<u8> {
        let mut p = vec![family, 1, 0, 0];
        p.extend_from_slice(&local.port().to_be_bytes());
        p.extend_from_slice(&remote.port().to_be_bytes());
        p.extend_from_slice(&local.ip().octets());
        p.extend_from_slice(&[0; 12]);
        p.extend_from_slice(&remote.ip().octets());
        p.extend_from_slice(&[0; 12]);
        p.extend_from_slice(&0u32.to_ne_bytes()); // if
        p.extend_from_slice(&(cookie as u32).to_ne_bytes());
        p.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        p.extend_from_slice(&[0; 20]);
        assert_eq!(p.len(), DIAG_MSG_LEN);
        p
    }

    fn error_payload(code: i32) -> Vec<u8> {
        let mut p = code.to_ne_bytes().to_vec();
        p.extend_from_slice(&[0; NLMSG_HDRLEN]); // the request's header
        p
    }

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn malformed(r: Result<impl std::fmt::Debug, Error>) -> Malformed {
        match r {
            Err(Error::Malformed { reason, .. }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn dump_request_is_a_udp_v4_dump_of_all_states() {
        let r = dump_request(7, None);
        assert_eq!(r.len(), 72);
        assert_eq!(u32_at(&r, 0), 72);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32_at(&r, 8), 7);
        assert_eq!(
            &r[16..20],
            &[libc::AF_INET as u8, libc::IPPROTO_UDP as u8, 0, 0]
        );
        assert_eq!(u32_at(&r, 20), u32::MAX);
        assert!(r[24..].iter().all(|b| *b == 0));

        let r = dump_request(7, Some(5353));
        assert_eq!(&r[24..28], &[0, 0, 0x14, 0xe9]); // sport any, dport 5353 (BE)
        assert!(r[28..].iter().all(|b| *b == 0));
    }

    #[test]
    fn common_port_only_when_all_targets_share_it() {
        let a = Ipv4Addr::new(198, 18, 0, 50);
        assert_eq!(common_port(&[]), None);
        assert_eq!(common_port(&[(a, 53), (a, 53)]), Some(53));
        assert_eq!(common_port(&[(a, 53), (a, 54)]), None);
    }

    #[test]
    fn destroy_request_echoes_the_socket_id() {
        let p = diag(
            libc::AF_INET as u8,
            sa("198.18.0.1:40000"),
            sa("198.18.0.50:5353"),
            0x1234_5678_9abc,
        );
        let part = parse_dump(&msg(SOCK_DIAG_BY_FAMILY, 1, &p), 1).unwrap();
        let r = destroy_request(9, &part.sockets[0]);
        assert_eq!(r.len(), 72);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), SOCK_DESTROY);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&r, 8), 9);
        assert_eq!(&r[16..18], &[libc::AF_INET as u8, libc::IPPROTO_UDP as u8]);
        assert_eq!(&r[24..], &p[4..4 + SOCKID_LEN]);
    }

    #[test]
    fn multipart_dump_until_done() {
        let first = [
            msg(
                SOCK_DIAG_BY_FAMILY,
                1,
                &diag(
                    2,
                    sa("198.18.0.1:40000"),
                    sa("198.18.0.50:5353"),
                    0x1_0000_0002,
                ),
            ),
            msg(
                SOCK_DIAG_BY_FAMILY,
                1,
                &diag(2, sa("0.0.0.0:5353"), sa("0.0.0.0:0"), 3),
            ),
            // AF_INET6 (not asked for) is skipped, not an error.
            msg(
                SOCK_DIAG_BY_FAMILY,
                1,
                &diag(10, sa("0.0.0.0:1"), sa("0.0.0.0:2"), 4),
            ),
        ]
        .concat();
        let part = parse_dump(&first, 1).unwrap();
        assert!(!part.done);
        assert_eq!(part.sockets.len(), 2);
        assert_eq!(part.sockets[0].local, sa("198.18.0.1:40000"));
        assert_eq!(part.sockets[0].remote, sa("198.18.0.50:5353"));
        assert_eq!(part.sockets[0].cookie, 0x1_0000_0002);
        assert_eq!(part.sockets[1].remote, sa("0.0.0.0:0"));

        let last = [
            msg(
                SOCK_DIAG_BY_FAMILY,
                1,
                &diag(2, sa("198.18.0.1:40001"), sa("198.18.0.51:5353"), 5),
            ),
            msg(NLMSG_DONE, 1, &0i32.to_ne_bytes()),
        ]
        .concat();
        let part = parse_dump(&last, 1).unwrap();
        assert!(part.done);
        assert_eq!(part.sockets.len(), 1);
        assert_eq!(part.sockets[0].remote, sa("198.18.0.51:5353"));

        // Old kernels: NLMSG_DONE without a payload.
        assert!(parse_dump(&msg(NLMSG_DONE, 1, &[]), 1).unwrap().done);
    }

    #[test]
    fn dump_errors_are_errors() {
        match parse_dump(&msg(NLMSG_ERROR, 1, &error_payload(-libc::ENOENT)), 1) {
            Err(Error::Netlink { request, source }) => {
                assert_eq!(request, DUMP);
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("{other:?}"),
        }
        match parse_dump(&msg(NLMSG_DONE, 1, &(-libc::EINTR).to_ne_bytes()), 1) {
            Err(Error::Netlink { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EINTR))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            malformed(parse_dump(&msg(NLMSG_ERROR, 1, &error_payload(0)), 1)),
            Malformed::UnexpectedType { ty: NLMSG_ERROR }
        );
    }

    #[test]
    fn malformed_dumps_are_errors_not_panics() {
        let good = msg(
            SOCK_DIAG_BY_FAMILY,
            1,
            &diag(2, sa("198.18.0.1:40000"), sa("198.18.0.50:5353"), 1),
        );
        // Every truncation of a valid message fails cleanly.
        for cut in 1..good.len() {
            assert!(parse_dump(&good[..cut], 1).is_err(), "cut at {cut}");
        }
        assert_eq!(
            malformed(parse_dump(&good[..10], 1)),
            Malformed::Truncated { len: 10 }
        );
        // nlmsg_len beyond the datagram.
        let mut long = good.clone();
        long[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert_eq!(
            malformed(parse_dump(&long, 1)),
            Malformed::BadLength {
                len: 200,
                remaining: 88
            }
        );
        // nlmsg_len shorter than a header: no endless loop.
        let mut short = good.clone();
        short[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert_eq!(
            malformed(parse_dump(&short, 1)),
            Malformed::BadLength {
                len: 4,
                remaining: 88
            }
        );
        // A consistent header around too short an inet_diag_msg.
        assert_eq!(
            malformed(parse_dump(&msg(SOCK_DIAG_BY_FAMILY, 1, &[2; 40]), 1)),
            Malformed::ShortPayload {
                ty: SOCK_DIAG_BY_FAMILY,
                len: 40,
                need: DIAG_MSG_LEN
            }
        );
        assert_eq!(
            malformed(parse_dump(&msg(NLMSG_ERROR, 1, &[0xff, 0xff]), 1)),
            Malformed::ShortPayload {
                ty: NLMSG_ERROR,
                len: 2,
                need: 4
            }
        );
        assert_eq!(
            malformed(parse_dump(&good, 2)),
            Malformed::UnexpectedSeq { want: 2, got: 1 }
        );
        assert_eq!(
            malformed(parse_dump(&msg(99, 1, &[]), 1)),
            Malformed::UnexpectedType { ty: 99 }
        );
        // A datagram that ends without NLMSG_DONE is just not done yet.
        assert_eq!(parse_dump(&[], 1).unwrap(), DumpPart::default());
    }

    #[test]
    fn acks() {
        parse_ack(&msg(NLMSG_ERROR, 4, &error_payload(0)), 4).unwrap();
        match parse_ack(&msg(NLMSG_ERROR, 4, &error_payload(-libc::ENOENT)), 4) {
            Err(Error::Netlink { request, source }) => {
                assert_eq!(request, DESTROY);
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("{other:?}"),
        }
        // The kernel may cap the echoed request: the errno alone suffices.
        parse_ack(&msg(NLMSG_ERROR, 4, &0i32.to_ne_bytes()), 4).unwrap();
        assert_eq!(malformed(parse_ack(&[], 4)), Malformed::NoAck);
        assert_eq!(
            malformed(parse_ack(&msg(NLMSG_ERROR, 3, &error_payload(0)), 4)),
            Malformed::UnexpectedSeq { want: 4, got: 3 }
        );
        assert_eq!(
            malformed(parse_ack(&msg(NLMSG_DONE, 4, &[0; 4]), 4)),
            Malformed::UnexpectedType { ty: NLMSG_DONE }
        );
        let ack = msg(NLMSG_ERROR, 4, &error_payload(0));
        for cut in 1..ack.len() {
            assert!(parse_ack(&ack[..cut], 4).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn errors_name_what_failed() {
        let e = destroy_udp_to_in(
            Path::new("/nonexistent/weft-test-netns"),
            &[(Ipv4Addr::new(198, 18, 0, 50), 5353)],
        )
        .unwrap_err();
        assert!(matches!(e, Error::OpenNetns { .. }), "{e:?}");
        assert!(
            e.to_string().contains("/nonexistent/weft-test-netns"),
            "{e}"
        );

        let e = Error::Destroy {
            destroyed: 1,
            failures: vec![DestroyFailure {
                local: sa("198.18.0.1:40000"),
                remote: sa("198.18.0.50:5353"),
                cookie: 0x2a,
                source: io::Error::from_raw_os_error(libc::EPERM),
            }],
        };
        let text = e.to_string();
        assert!(text.starts_with("SOCK_DESTROY failed for 1 UDP socket(s), 1 destroyed; first: 198.18.0.1:40000 -> 198.18.0.50:5353 (cookie 0x2a): "), "{text}");
    }

    #[test]
    fn nothing_to_do_without_targets() {
        assert_eq!(destroy_udp_to(&[]).unwrap(), 0);
        assert_eq!(
            destroy_udp_to_in(Path::new("/nonexistent"), &[]).unwrap(),
            0
        );
    }
}
