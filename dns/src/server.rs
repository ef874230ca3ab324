//! UDP and TCP listeners for [`ClusterDns`], with their limits.
//!
//! UDP: one task per socket answers cluster names inline (no task per
//! query); a query that needs the upstreams is handed to a task, at most
//! `max_pending` at once (beyond that: SERVFAIL at once, never an unbounded
//! queue). TCP: at most `tcp_connections` connections (further ones are
//! closed at accept), each closed after `tcp_idle` without a complete
//! query, with at most `tcp_queries` queries per connection; messages are
//! length-prefixed (RFC 1035 4.2.2) and answered in order.

use crate::handler::{ClusterDns, Outcome, Transport};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Listener limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub tcp_connections: usize,
    pub tcp_idle: Duration,
    pub tcp_queries: usize,
    /// Queries waiting for the upstreams at once (per server).
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tcp_connections: 256,
            tcp_idle: Duration::from_secs(10),
            tcp_queries: 1000,
            max_pending: 1024,
        }
    }
}

/// A listening server: its sockets' tasks end when this is dropped.
pub struct Server {
    tasks: JoinSet<()>,
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Server {
    /// Bind UDP and TCP on every address and start serving. Must run inside
    /// a tokio runtime.
    pub async fn bind(
        dns: Arc<ClusterDns>,
        addrs: &[SocketAddr],
        limits: Limits,
    ) -> Result<Server, ServeError> {
        let mut sockets = Vec::new();
        for addr in addrs {
            let udp = UdpSocket::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    proto: "udp",
                    addr: *addr,
                    source,
                })?;
            grow_receive_buffer(&udp, UDP_RECEIVE_BUFFER);
            // The same port for TCP when the UDP one was chosen by the kernel.
            let tcp_addr = udp.local_addr().unwrap_or(*addr);
            let tcp = TcpListener::bind(tcp_addr)
                .await
                .map_err(|source| ServeError::Bind {
                    proto: "tcp",
                    addr: tcp_addr,
                    source,
                })?;
            sockets.push((udp, tcp));
        }
        let mut server = Server {
            tasks: JoinSet::new(),
            udp: Vec::new(),
            tcp: Vec::new(),
        };
        let pending = Arc::new(Semaphore::new(limits.max_pending));
        for (udp, tcp) in sockets {
            if let Ok(a) = udp.local_addr() {
                server.udp.push(a);
            }
            if let Ok(a) = tcp.local_addr() {
                server.tcp.push(a);
            }
            server
                .tasks
                .spawn(serve_udp(dns.clone(), Arc::new(udp), pending.clone()));
            server
                .tasks
                .spawn(serve_tcp(dns.clone(), tcp, limits.clone(), pending.clone()));
        }
        Ok(server)
    }

    /// Wait until every listener ended (they end only on fatal errors).
    pub async fn wait(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The UDP receive buffer asked for: a burst of queries waits in the
/// socket instead of being dropped while the loop is busy (the kernel's
/// default, ~208 KiB, lost a few per 10 s at 90k qps in `bench dns`).
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// SO_RCVBUFFORCE (root, past net.core.rmem_max), else SO_RCVBUF (capped at
/// rmem_max); best effort.
fn grow_receive_buffer(sock: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes of `v`; the fd
        // is the socket's own.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

async fn serve_udp(dns: Arc<ClusterDns>, sock: Arc<UdpSocket>, pending: Arc<Semaphore>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier sends surface here; keep serving.
                tracing::debug!(error = %e, "dns udp receive");
                continue;
            }
        };
        match dns.respond_now(&buf[..n], src.ip(), Transport::Udp) {
            Outcome::Reply(bytes) => {
                let _ = sock.send_to(&bytes, src).await;
            }
            Outcome::Drop => {}
            Outcome::Pending(p) => match pending.clone().try_acquire_owned() {
                Ok(permit) => {
                    let dns = dns.clone();
                    let sock = sock.clone();
                    tokio::spawn(async move {
                        let bytes = dns.finish(p).await;
                        let _ = sock.send_to(&bytes, src).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    let _ = sock.send_to(&dns.busy(p), src).await;
                }
            },
        }
    }
}

async fn serve_tcp(
    dns: Arc<ClusterDns>,
    listener: TcpListener,
    limits: Limits,
    pending: Arc<Semaphore>,
) {
    let conns = Arc::new(Semaphore::new(limits.tcp_connections));
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "dns tcp accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::debug!(%src, "dns tcp connection limit reached; closing");
            drop(stream);
            continue;
        };
        let dns = dns.clone();
        let limits = limits.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let _ = tcp_connection(&dns, stream, src, &limits, &pending).await;
            drop(permit);
        });
    }
}

async fn tcp_connection(
    dns: &ClusterDns,
    mut stream: TcpStream,
    src: SocketAddr,
    limits: &Limits,
    pending: &Semaphore,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    for _ in 0..limits.tcp_queries {
        let read = async {
            let len = stream.read_u16().await? as usize;
            buf.resize(len, 0);
            stream.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(limits.tcp_idle, read).await {
            Ok(Ok(())) => {}
            // Idle too long, or closed, or a short message: done.
            _ => return Ok(()),
        }
        let reply = match dns.respond_now(&buf, src.ip(), Transport::Tcp) {
            Outcome::Reply(b) => b,
            Outcome::Drop => continue,
            Outcome::Pending(p) => match pending.try_acquire() {
                Ok(permit) => {
                    let r = dns.finish(p).await;
                    drop(permit);
                    r
                }
                Err(_) => dns.busy(p),
            },
        };
        if reply.len() > u16::MAX as usize {
            continue;
        }
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        out.extend_from_slice(&reply);
        tokio::time::timeout(limits.tcp_idle, stream.write_all(&out))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone::tests::fixture;
    use crate::zone::PodRecords;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    async fn tcp_ask(s: &mut TcpStream, raw: &[u8]) -> std::io::Result<Message> {
        let mut framed = (raw.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(raw);
        s.write_all(&framed).await?;
        let len = s.read_u16().await? as usize;
        let mut buf = vec![0; len];
        s.read_exact(&mut buf).await?;
        Ok(Message::from_vec(&buf).unwrap())
    }

    #[tokio::test]
    async fn serves_udp_and_tcp_with_limits() {
        let dns = Arc::new(ClusterDns::new(
            fixture(PodRecords::Disabled),
            None,
            Vec::new(),
        ));
        let limits = Limits {
            tcp_connections: 2,
            tcp_idle: Duration::from_millis(300),
            tcp_queries: 3,
            max_pending: 4,
        };
        let server = Server::bind(dns.clone(), &["127.0.0.1:0".parse().unwrap()], limits)
            .await
            .unwrap();
        let addr = server.udp[0];
        assert_eq!(server.tcp[0], addr, "UDP and TCP share the port");

        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(&query("web.shop.svc.cluster.local."), addr)
            .await
            .unwrap();
        let mut buf = vec![0; 1500];
        let n = c.recv(&mut buf).await.unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.answers[0].data.to_string(), "198.19.0.20");
        // Garbage is answered FORMERR or dropped, and the server keeps serving.
        c.send_to(&[0xff; 5], addr).await.unwrap();
        c.send_to(&query("db.shop.svc.cluster.local."), addr)
            .await
            .unwrap();
        let n = c.recv(&mut buf).await.unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 2);

        // TCP: several queries on one connection, in order.
        let mut a = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            let r = tcp_ask(&mut a, &query("web.shop.svc.cluster.local."))
                .await
                .unwrap();
            assert_eq!(r.answers.len(), 1);
        }
        // The third query is the connection's last (tcp_queries = 3): then closed.
        tcp_ask(&mut a, &query("web.shop.svc.cluster.local."))
            .await
            .unwrap();
        let mut one = [0u8; 1];
        assert_eq!(
            a.read(&mut one).await.unwrap(),
            0,
            "closed after its query budget"
        );

        // Two connections at most: a third is closed at once.
        let mut b = TcpStream::connect(addr).await.unwrap();
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        tcp_ask(&mut b, &query("web.shop.svc.cluster.local."))
            .await
            .unwrap();
        tcp_ask(&mut c2, &query("web.shop.svc.cluster.local."))
            .await
            .unwrap();
        let mut d = TcpStream::connect(addr).await.unwrap();
        assert!(
            tcp_ask(&mut d, &query("web.shop.svc.cluster.local."))
                .await
                .is_err(),
            "a connection over the cap is closed"
        );
        // An idle connection is closed after tcp_idle; its slot frees up.
        assert_eq!(b.read(&mut one).await.unwrap(), 0, "idle connection closed");
        assert_eq!(
            c2.read(&mut one).await.unwrap(),
            0,
            "idle connection closed"
        );
        let mut e = TcpStream::connect(addr).await.unwrap();
        tcp_ask(&mut e, &query("web.shop.svc.cluster.local."))
            .await
            .unwrap();
        drop(server);
    }
}
