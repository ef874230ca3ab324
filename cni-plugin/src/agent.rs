//! Best-effort pod notifications to the weft agent over its unix socket.
//! The agent may be away (restarting, upgrading): then nothing is sent and the
//! agent learns the pod later from the IPAM claim files.

use std::io::{self, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

pub const TIMEOUT: Duration = Duration::from_millis(100);

/// One JSON line sent to the agent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PodEvent {
    /// `add` or `del`.
    pub op: &'static str,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The pod address with prefix, e.g. `198.18.128.5/24`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(rename = "podNamespace", skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(rename = "podName", skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(rename = "podUID", skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// Send `event` if the agent socket exists; failures are logged, not returned.
pub fn notify(socket: &Path, event: &PodEvent) {
    if !socket.exists() {
        tracing::debug!(socket = %socket.display(), "agent socket absent, not notifying");
        return;
    }
    if let Err(e) = send(socket, event) {
        tracing::warn!(socket = %socket.display(), op = event.op, error = %e,
            "could not notify the agent; it will reconcile from the IPAM directory");
    }
}

fn send(socket: &Path, event: &PodEvent) -> io::Result<()> {
    let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut stream = connect_nonblocking(socket)?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(&line)?;
    Ok(())
}

/// `UnixStream::connect` blocks while the listener's backlog is full; a
/// non-blocking connect fails fast with `EAGAIN` instead.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: zeroed sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "agent socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the fd is owned by the UnixStream below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a properly initialised sockaddr_un of at least `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn event() -> PodEvent {
        PodEvent {
            op: "add",
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/p".into()),
            ip: Some("198.18.128.5/24".into()),
            pod_namespace: Some("default".into()),
            pod_name: Some("web".into()),
            pod_uid: None,
        }
    }

    #[test]
    fn sends_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        notify(&path, &event());
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(conn).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["op"], "add");
        assert_eq!(v["containerID"], "abc");
        assert_eq!(v["podNamespace"], "default");
        assert_eq!(v["ip"], "198.18.128.5/24");
        assert!(v.get("podUID").is_none());
    }

    #[test]
    fn absent_or_dead_agent_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        notify(&path, &event());
        // A stale socket file with no listener: connection refused, ignored.
        drop(UnixListener::bind(&path).unwrap());
        assert!(send(&path, &event()).is_err());
        notify(&path, &event());
    }
}
