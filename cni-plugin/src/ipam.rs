//! Node-local IPAM: one claim file per allocated address in a per-network
//! directory, serialized by a directory-wide `flock`.
//!
//! Layout of `<ipamDir>/<network>/`:
//! - `lock` — held (`LOCK_EX`) for every allocate/release/scan-and-free;
//! - `<ip>` (e.g. `198.18.128.5`) — a claim: `containerID\nifname\n` then
//!   optional `key=value` lines (`netns`, `podNamespace`, `podName`, `podUID`,
//!   one `portMapping` per hostPort) so the agent can learn pods it missed,
//!   and program their hostPorts, by reading the directory;
//! - `last_reserved` — the last address handed out, so allocation rotates
//!   through the subnet instead of reusing a just-freed address at once.
//!
//! Crash safety: a claim is written to `.tmp-<ip>`, then `link()`ed to its
//! final name (which fails instead of overwriting); a crash of the plugin
//! leaves either a complete claim or none, plus maybe a temp file that the
//! next locked operation removes. With `durable` (config `ipamFsync`) the
//! temp file and the directory are also fsynced, so claims survive a machine
//! crash too. That is off by default: after a machine crash every pod network
//! namespace is gone, so surviving claims are stale anyway (GC frees them),
//! and on ext4 the two fsyncs cost 4–12 ms per ADD and DEL. A claim whose
//! content was lost (empty file) still counts as taken until GC frees it.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

use crate::config::Attachment;

const LOCK_FILE: &str = "lock";
const CURSOR_FILE: &str = "last_reserved";
const TMP_PREFIX: &str = ".tmp-";

pub use weft_model::node_state::Claim;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM {op} in {dir}")]
    Io {
        op: &'static str,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no free address in {subnet}")]
    Exhausted { subnet: Ipv4Network },
}

/// A claim file that could not be parsed is still an occupied address; GC
/// frees it because it matches no valid attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ip: Ipv4Addr,
    pub claim: Option<Claim>,
}

/// The IPAM store of one network.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    durable: bool,
}

/// The directory-wide lock; released on drop (close).
struct Lock(#[allow(dead_code)] File);

impl Ipam {
    /// Open (creating if needed) the store at `dir`; `durable` fsyncs every
    /// change (see the module docs).
    pub fn open(dir: &Path, durable: bool) -> Result<Ipam, IpamError> {
        fs::create_dir_all(dir).map_err(|source| IpamError::Io {
            op: "create directory",
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(Ipam {
            dir: dir.to_path_buf(),
            durable,
        })
    }

    /// Open an existing store; `None` if it was never created (nothing to free).
    pub fn open_existing(dir: &Path, durable: bool) -> Option<Ipam> {
        dir.is_dir().then(|| Ipam {
            dir: dir.to_path_buf(),
            durable,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> IpamError + '_ {
        move |source| IpamError::Io {
            op,
            dir: self.dir.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<Lock, IpamError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.dir.join(LOCK_FILE))
            .map_err(self.err("open lock"))?;
        loop {
            // SAFETY: flock on a valid, owned descriptor.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Lock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(self.err("lock")(e));
            }
        }
    }

    /// All claims; the caller holds the lock.
    fn scan_unlocked(&self) -> Result<Vec<Entry>, IpamError> {
        let mut out = Vec::new();
        for dirent in fs::read_dir(&self.dir).map_err(self.err("read directory"))? {
            let dirent = dirent.map_err(self.err("read directory"))?;
            let name = dirent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) {
                // Only writers holding the lock create temp files, and every
                // caller of this function holds it: this one is a crash leftover.
                let _ = fs::remove_file(dirent.path());
                continue;
            }
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            let claim = match fs::read_to_string(dirent.path()) {
                Ok(text) => Claim::decode(&text),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("read claim")(e)),
            };
            out.push(Entry { ip, claim });
        }
        out.sort_by_key(|e| e.ip);
        Ok(out)
    }

    /// Every claim in the store.
    pub fn entries(&self) -> Result<Vec<Entry>, IpamError> {
        let _lock = self.lock()?;
        self.scan_unlocked()
    }

    /// The address claimed by an attachment, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self.find_entry(container_id, ifname)?.map(|e| e.ip))
    }

    /// The claim of an attachment, if any.
    pub fn find_entry(&self, container_id: &str, ifname: &str) -> Result<Option<Entry>, IpamError> {
        Ok(self.entries()?.into_iter().find(|e| {
            e.claim
                .as_ref()
                .is_some_and(|c| c.matches(container_id, ifname))
        }))
    }

    /// Claim an address of `subnet` (never its network, broadcast or
    /// `gateway` address) for `claim`. An attachment that already holds an
    /// address gets it back, with its claim rewritten if `claim` says
    /// something new (a repeated ADD with other hostPorts). The returned guard releases the address when
    /// dropped unless [`Allocation::commit`] is called, so an ADD failing
    /// midway gives it back.
    pub fn allocate(
        &self,
        subnet: Ipv4Network,
        gateway: Ipv4Addr,
        claim: &Claim,
    ) -> Result<Allocation<'_>, IpamError> {
        let _lock = self.lock()?;
        let entries = self.scan_unlocked()?;
        if let Some(e) = entries.iter().find(|e| {
            e.claim
                .as_ref()
                .is_some_and(|c| c.matches(&claim.container_id, &claim.ifname))
        }) {
            if e.claim.as_ref() != Some(claim) {
                self.replace_claim(e.ip, &claim.encode())
                    .map_err(self.err("rewrite claim"))?;
            }
            return Ok(Allocation::new(self, e.ip, claim));
        }
        let mut used: HashSet<Ipv4Addr> = entries.into_iter().map(|e| e.ip).collect();
        used.insert(gateway);
        let first = u32::from(subnet.network()) + 1;
        let last = u32::from(subnet.broadcast()) - 1;
        let size = last - first + 1;
        let start = fs::read_to_string(self.dir.join(CURSOR_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|c| (first..=last).contains(c))
            .map_or(0, |c| c - first + 1);
        let body = claim.encode();
        for i in 0..size {
            let ip = Ipv4Addr::from(first + (start + i) % size);
            if used.contains(&ip) {
                continue;
            }
            match self.write_claim(ip, &body) {
                Ok(()) => {
                    let _ = fs::write(self.dir.join(CURSOR_FILE), ip.to_string());
                    return Ok(Allocation::new(self, ip, claim));
                }
                // Someone wrote it without the lock (an older tool?): skip it.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    used.insert(ip);
                }
                Err(e) => return Err(self.err("write claim")(e)),
            }
        }
        Err(IpamError::Exhausted { subnet })
    }

    /// The claim's content in a temporary file next to it (synced when durable).
    fn write_tmp(&self, ip: Ipv4Addr, body: &str) -> io::Result<std::path::PathBuf> {
        let tmp = self.dir.join(format!("{TMP_PREFIX}{ip}"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        f.write_all(body.as_bytes())?;
        if self.durable {
            f.sync_data()?;
        }
        Ok(tmp)
    }

    fn write_claim(&self, ip: Ipv4Addr, body: &str) -> io::Result<()> {
        let tmp = self.write_tmp(ip, body)?;
        let linked = fs::hard_link(&tmp, self.dir.join(ip.to_string()));
        let _ = fs::remove_file(&tmp);
        linked?;
        self.sync_dir()
    }

    /// Atomically replace an existing claim (the caller holds the lock).
    fn replace_claim(&self, ip: Ipv4Addr, body: &str) -> io::Result<()> {
        let tmp = self.write_tmp(ip, body)?;
        if let Err(e) = fs::rename(&tmp, self.dir.join(ip.to_string())) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.sync_dir()
    }

    fn sync_dir(&self) -> io::Result<()> {
        if !self.durable {
            return Ok(());
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Free every address held by the attachment; returns what was freed.
    pub fn release(&self, container_id: &str, ifname: &str) -> Result<Vec<Ipv4Addr>, IpamError> {
        self.release_where(|e| {
            e.claim
                .as_ref()
                .is_some_and(|c| c.matches(container_id, ifname))
        })
        .map(|v| v.into_iter().map(|e| e.ip).collect())
    }

    /// Free `ip` if `claim`'s attachment still holds it.
    fn release_ip(&self, ip: Ipv4Addr, claim: &Claim) -> Result<(), IpamError> {
        self.release_where(|e| {
            e.ip == ip
                && e.claim
                    .as_ref()
                    .is_some_and(|c| c.matches(&claim.container_id, &claim.ifname))
        })
        .map(|_| ())
    }

    /// GC: free every claim whose attachment is not in `keep`; returns the
    /// freed entries so the caller can remove their interfaces.
    pub fn retain(&self, keep: &[Attachment]) -> Result<Vec<Entry>, IpamError> {
        self.release_where(|e| match &e.claim {
            None => true,
            Some(c) => !keep.iter().any(|a| c.matches(&a.container_id, &a.ifname)),
        })
    }

    fn release_where(&self, doomed: impl Fn(&Entry) -> bool) -> Result<Vec<Entry>, IpamError> {
        let _lock = self.lock()?;
        let mut freed = Vec::new();
        for e in self.scan_unlocked()? {
            if doomed(&e) {
                match fs::remove_file(self.dir.join(e.ip.to_string())) {
                    Ok(()) => freed.push(e),
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(self.err("remove claim")(err)),
                }
            }
        }
        if !freed.is_empty() {
            self.sync_dir().map_err(self.err("sync directory"))?;
        }
        Ok(freed)
    }
}

/// An address claimed for an ADD in progress.
#[must_use]
pub struct Allocation<'a> {
    ipam: &'a Ipam,
    pub ip: Ipv4Addr,
    claim: Claim,
    committed: bool,
}

impl<'a> Allocation<'a> {
    fn new(ipam: &'a Ipam, ip: Ipv4Addr, claim: &Claim) -> Self {
        Allocation {
            ipam,
            ip,
            claim: claim.clone(),
            committed: false,
        }
    }

    /// Keep the address: the ADD succeeded.
    pub fn commit(mut self) -> Ipv4Addr {
        self.committed = true;
        self.ip
    }
}

impl Drop for Allocation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = self.ipam.release_ip(self.ip, &self.claim) {
                tracing::warn!(ip = %self.ip, error = %e, "releasing address of failed ADD");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use weft_model::node_state::PodRef;

    fn subnet() -> Ipv4Network {
        "198.18.128.0/24".parse().unwrap()
    }
    const GW: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 1);

    fn claim(id: &str) -> Claim {
        Claim {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: Some(format!("/run/netns/{id}")),
            pod: PodRef {
                namespace: Some("default".into()),
                name: Some(format!("pod-{id}")),
                uid: None,
            },
            port_mappings: Vec::new(),
        }
    }

    #[test]
    fn claim_encoding_round_trips_and_strips_newlines() {
        let mut c = claim("abc");
        assert_eq!(Claim::decode(&c.encode()), Some(c.clone()));
        c.pod.name = Some("evil\nnetns=/x".into());
        let d = Claim::decode(&c.encode()).unwrap();
        assert_eq!(d.netns.as_deref(), Some("/run/netns/abc"));
        assert!(Claim::decode("only-one-line\n").is_none());
    }

    #[test]
    fn port_mappings_are_stored_with_the_claim_and_updated_by_a_repeated_add() {
        use weft_model::node_state::PortMapping;
        use weft_model::view::Protocol;
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), false).unwrap();
        let mut c = claim("hp");
        c.port_mappings = vec![PortMapping {
            protocol: Protocol::TCP,
            host_port: 8080,
            container_port: 80,
            host_ip: None,
        }];
        let ip = ipam.allocate(subnet(), GW, &c).unwrap().commit();
        let text = fs::read_to_string(dir.path().join(ip.to_string())).unwrap();
        assert!(text.ends_with("portMapping=tcp/8080/80\n"), "{text}");
        let e = ipam.find_entry("hp", "eth0").unwrap().unwrap();
        assert_eq!((e.ip, e.claim.as_ref()), (ip, Some(&c)));
        // The same attachment again, now with another mapping: same address,
        // claim rewritten, no temp file left.
        c.port_mappings[0].host_port = 8081;
        assert_eq!(ipam.allocate(subnet(), GW, &c).unwrap().commit(), ip);
        assert_eq!(
            ipam.find_entry("hp", "eth0").unwrap().unwrap().claim,
            Some(c)
        );
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(TMP_PREFIX)),
            "{names:?}"
        );
        // DEL frees the claim, mappings and all.
        assert_eq!(ipam.release("hp", "eth0").unwrap(), vec![ip]);
        assert!(ipam.find_entry("hp", "eth0").unwrap().is_none());
    }

    #[test]
    fn allocates_skipping_gateway_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), true).unwrap();
        let a = ipam.allocate(subnet(), GW, &claim("a")).unwrap().commit();
        assert_eq!(a, Ipv4Addr::new(198, 18, 128, 2));
        let b = ipam.allocate(subnet(), GW, &claim("b")).unwrap().commit();
        assert_eq!(b, Ipv4Addr::new(198, 18, 128, 3));
        assert_eq!(ipam.release("a", "eth0").unwrap(), vec![a]);
        // The cursor moves on instead of reusing .2 at once.
        let c = ipam.allocate(subnet(), GW, &claim("c")).unwrap().commit();
        assert_eq!(c, Ipv4Addr::new(198, 18, 128, 4));
        // Same attachment again gets the same address.
        let b2 = ipam.allocate(subnet(), GW, &claim("b")).unwrap().commit();
        assert_eq!(b2, b);
        let text = fs::read_to_string(dir.path().join("198.18.128.3")).unwrap();
        assert!(text.starts_with("b\neth0\n"));
        assert!(text.contains("podName=pod-b\n"));
    }

    #[test]
    fn exhausts_a_small_subnet_without_network_broadcast_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), true).unwrap();
        let net: Ipv4Network = "198.18.128.0/29".parse().unwrap();
        let mut got: Vec<Ipv4Addr> = (0..5)
            .map(|i| {
                ipam.allocate(net, GW, &claim(&format!("c{i}")))
                    .unwrap()
                    .commit()
            })
            .collect();
        got.sort();
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(198, 18, 128, h)).collect();
        assert_eq!(got, want);
        assert!(matches!(
            ipam.allocate(net, GW, &claim("more")),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn dropping_an_uncommitted_allocation_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), true).unwrap();
        {
            let alloc = ipam.allocate(subnet(), GW, &claim("a")).unwrap();
            assert_eq!(ipam.find("a", "eth0").unwrap(), Some(alloc.ip));
            // ADD fails here: the guard goes out of scope.
        }
        assert_eq!(ipam.find("a", "eth0").unwrap(), None);
        assert!(ipam.entries().unwrap().is_empty());
    }

    #[test]
    fn release_is_idempotent_and_precise() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), true).unwrap();
        let _ = ipam.allocate(subnet(), GW, &claim("a")).unwrap().commit();
        let mut other = claim("a");
        other.ifname = "net1".into();
        let n1 = ipam.allocate(subnet(), GW, &other).unwrap().commit();
        assert_eq!(ipam.release("a", "eth0").unwrap().len(), 1);
        assert!(ipam.release("a", "eth0").unwrap().is_empty());
        assert_eq!(ipam.find("a", "net1").unwrap(), Some(n1));
    }

    #[test]
    fn crash_leftovers_are_cleaned_and_corrupt_claims_stay_occupied() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), true).unwrap();
        fs::write(dir.path().join(".tmp-198.18.128.2"), "half").unwrap();
        fs::write(dir.path().join("198.18.128.2"), "").unwrap();
        let a = ipam.allocate(subnet(), GW, &claim("a")).unwrap().commit();
        assert_eq!(a, Ipv4Addr::new(198, 18, 128, 3));
        assert!(!dir.path().join(".tmp-198.18.128.2").exists());
        // GC frees the corrupt claim and keeps the valid one.
        let keep = [Attachment {
            container_id: "a".into(),
            ifname: "eth0".into(),
        }];
        let freed = ipam.retain(&keep).unwrap();
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].ip, Ipv4Addr::new(198, 18, 128, 2));
        assert_eq!(ipam.entries().unwrap().len(), 1);
    }

    #[test]
    fn gc_selection() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), true).unwrap();
        for id in ["a", "b", "c", "d"] {
            let _ = ipam.allocate(subnet(), GW, &claim(id)).unwrap().commit();
        }
        let keep = [
            Attachment {
                container_id: "b".into(),
                ifname: "eth0".into(),
            },
            Attachment {
                container_id: "d".into(),
                ifname: "net1".into(),
            },
        ];
        let freed: Vec<String> = ipam
            .retain(&keep)
            .unwrap()
            .into_iter()
            .map(|e| e.claim.unwrap().container_id)
            .collect();
        assert_eq!(freed, vec!["a", "c", "d"]);
        assert_eq!(
            ipam.find("b", "eth0").unwrap(),
            Some(Ipv4Addr::new(198, 18, 128, 3))
        );
        assert!(ipam.retain(&[]).unwrap().len() == 1);
    }

    #[test]
    fn two_hundred_concurrent_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let n = 200;
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let path = path.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    // Each thread opens its own store, as separate plugin
                    // processes would; flock serializes them.
                    let ipam = Ipam::open(&path, false).unwrap();
                    barrier.wait();
                    let alloc = ipam
                        .allocate(subnet(), GW, &claim(&format!("c{i}")))
                        .unwrap();
                    if i % 10 == 0 {
                        // Every tenth ADD fails midway and must give its address back.
                        drop(alloc);
                        None
                    } else {
                        Some(alloc.commit())
                    }
                })
            })
            .collect();
        let mut ips: Vec<Ipv4Addr> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        let total = ips.len();
        assert_eq!(total, 180);
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), total, "duplicate addresses handed out");
        assert!(!ips.contains(&GW));
        let ipam = Ipam::open(&path, false).unwrap();
        let entries = ipam.entries().unwrap();
        assert_eq!(entries.len(), 180);
        for e in entries {
            let c = e.claim.unwrap();
            let i: usize = c.container_id[1..].parse().unwrap();
            assert_ne!(i % 10, 0, "failed ADD {i} kept its address");
        }
    }
}
