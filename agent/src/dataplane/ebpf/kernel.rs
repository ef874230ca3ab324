//! The kernel side of the eBPF dataplane: load the embedded object with its
//! maps pinned in bpffs, attach the socket programs to the node's cgroup
//! through pinned links, and read and write the maps.
//!
//! Everything that must outlive the agent lives under the bpffs directory
//! (`--bpffs-path`): `maps-v<ABI>/` (the maps) and `links/` (one pinned link
//! per program). A restart finds both: the loader reuses the pinned maps and
//! each link is switched to the newly loaded program with BPF_LINK_UPDATE,
//! an atomic replacement (no instant without a program). Nothing is ever
//! detached on exit; removing the directory detaches and frees it all.

use super::object;
use super::reconcile::{Image, MapStore};
use aya::maps::Array;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{
    links::FdLink, CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType,
};
use aya::{Ebpf, EbpfLoader, Pod};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use weft_ebpf_abi::{
    AffinityMatchKey, Backend, BackendKey, CtKey, CtValue, MaglevTable, NodeConfig, ServiceKey,
    ServiceValue, ABI_VERSION, AFFINITY_MATCH_MAP, BACKENDS_MAP, CT_FORWARD, CT_MAP, MAGLEV_MAP,
    NODE_MAP, SERVICES_MAP,
};

/// The north-south program, attached at TC ingress of the node's uplink,
/// pod bridge and VXLAN device.
pub const TC_PROGRAM: &str = "weft_tc_ingress";

/// The interfaces the TC program serves, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcInterfaces {
    /// The node's own address; its interface is the uplink.
    pub node_addr: Ipv4Addr,
    pub bridge: String,
    pub vxlan: String,
}

/// One interface as found: index and first IPv4 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    /// Its IPv4 addresses, in the kernel's order.
    pub addrs: Vec<Ipv4Addr>,
}

impl Interface {
    fn addr(&self) -> Option<Ipv4Addr> {
        self.addrs.first().copied()
    }
}

/// The socket programs and the cgroup hook each one attaches to.
pub const SOCKET_PROGRAMS: [&str; 4] = [
    "weft_connect4",
    "weft_sendmsg4",
    "weft_recvmsg4",
    "weft_getpeername4",
];

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object (maps pinned in {pin_dir})")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {program}: {what}")]
    Program { program: &'static str, what: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// How each program got attached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Programs attached through a new link (first start on this node).
    pub attached: Vec<&'static str>,
    /// Programs that replaced an earlier one in a pinned link (restart, upgrade).
    pub replaced: Vec<&'static str>,
}

/// The loaded object, its maps, and where they are pinned.
pub struct Kernel {
    _bpf: Ebpf,
    root: PathBuf,
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, BackendKey, Backend>,
    maglev: BpfHashMap<MapData, u32, MaglevTable>,
    affinity_match: BpfHashMap<MapData, AffinityMatchKey, u32>,
    node: Array<MapData, NodeConfig>,
    ct: BpfHashMap<MapData, CtKey, CtValue>,
    pub attach: AttachReport,
    /// Interfaces the TC program is attached to (name -> ifindex), and the
    /// node configuration last written.
    tc: BTreeMap<String, u32>,
    node_written: Option<NodeConfig>,
}

impl Kernel {
    /// Load (or reuse) the maps under `bpffs` and attach the socket programs
    /// to `cgroup`, replacing what an earlier agent attached.
    pub fn open(bpffs: &Path, cgroup: &Path) -> Result<Kernel, KernelError> {
        ensure_bpffs(bpffs)?;
        let pin_dir = bpffs.join(format!("maps-v{ABI_VERSION}"));
        let links = bpffs.join("links");
        for dir in [&pin_dir, &links] {
            std::fs::create_dir_all(dir).map_err(|source| KernelError::Bpffs {
                path: dir.clone(),
                source,
            })?;
        }
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(object::object())
            .map_err(|source| KernelError::Load {
                pin_dir: pin_dir.clone(),
                source: Box::new(source),
            })?;
        let cgroup_dir = std::fs::File::open(cgroup).map_err(|source| KernelError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let mut attach = AttachReport::default();
        for name in SOCKET_PROGRAMS {
            let prog: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .ok_or_else(|| KernelError::Program {
                    program: name,
                    what: "not in the object".into(),
                })?
                .try_into()
                .map_err(|e| KernelError::Program {
                    program: name,
                    what: format!("not a cgroup/sock_addr program: {e}"),
                })?;
            prog.load().map_err(|e| KernelError::Program {
                program: name,
                what: format!("verifier: {e}"),
            })?;
            let pin = links.join(name);
            if pin.exists() {
                let prog_fd = prog
                    .fd()
                    .map_err(|e| KernelError::Program {
                        program: name,
                        what: e.to_string(),
                    })?
                    .as_fd()
                    .as_raw_fd();
                replace_in_link(&pin, prog_fd)?;
                attach.replaced.push(name);
            } else {
                let id = prog
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .map_err(|e| KernelError::Program {
                        program: name,
                        what: format!("attach to {}: {e}", cgroup.display()),
                    })?;
                let link = prog.take_link(id).map_err(|e| KernelError::Program {
                    program: name,
                    what: e.to_string(),
                })?;
                let fd_link = FdLink::try_from(link).map_err(|e| KernelError::Program {
                    program: name,
                    what: format!("not a bpf_link: {e}"),
                })?;
                fd_link.pin(&pin).map_err(|e| KernelError::Link {
                    path: pin.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                attach.attached.push(name);
            }
        }
        let tc: &mut SchedClassifier = bpf
            .program_mut(TC_PROGRAM)
            .ok_or_else(|| KernelError::Program {
                program: TC_PROGRAM,
                what: "not in the object".into(),
            })?
            .try_into()
            .map_err(|e| KernelError::Program {
                program: TC_PROGRAM,
                what: format!("not a classifier: {e}"),
            })?;
        tc.load().map_err(|e| KernelError::Program {
            program: TC_PROGRAM,
            what: format!("verifier: {e}"),
        })?;
        let node_map = bpf.take_map(NODE_MAP).ok_or_else(|| KernelError::Map {
            map: NODE_MAP,
            source: Box::new(aya::maps::MapError::InvalidName {
                name: NODE_MAP.to_string(),
            }),
        })?;
        let node = Array::try_from(node_map).map_err(map_err(NODE_MAP))?;
        let ct = typed(&mut bpf, CT_MAP)?;
        let services = typed(&mut bpf, SERVICES_MAP)?;
        let backends = typed(&mut bpf, BACKENDS_MAP)?;
        let maglev = typed(&mut bpf, MAGLEV_MAP)?;
        let affinity_match = typed(&mut bpf, AFFINITY_MATCH_MAP)?;
        remove_old_abi_dirs(bpffs);
        Ok(Kernel {
            _bpf: bpf,
            root: bpffs.to_path_buf(),
            services,
            backends,
            maglev,
            affinity_match,
            node,
            ct,
            attach,
            tc: BTreeMap::new(),
            node_written: None,
        })
    }

    /// Attach the TC program to the node's interfaces that exist (again
    /// where one was recreated), and write their indexes and addresses for
    /// it. Returns the interfaces newly attached; the bridge appears with
    /// the first pod, so this runs on every sync.
    pub fn ensure_tc(&mut self, want: &TcInterfaces) -> Result<Vec<String>, KernelError> {
        let found = interfaces().map_err(|source| KernelError::Link {
            path: PathBuf::from("getifaddrs"),
            source,
        })?;
        let uplink = found
            .iter()
            .find(|i| i.addrs.contains(&want.node_addr))
            .cloned();
        let by_name = |n: &str| found.iter().find(|i| i.name == n).cloned();
        let bridge = by_name(&want.bridge);
        let vxlan = by_name(&want.vxlan);
        let mut attached = Vec::new();
        for iface in [&uplink, &bridge, &vxlan].into_iter().flatten() {
            if self.tc.get(&iface.name) == Some(&iface.ifindex) {
                continue;
            }
            self.attach_tc(iface)?;
            self.tc.insert(iface.name.clone(), iface.ifindex);
            attached.push(iface.name.clone());
        }
        let config = NodeConfig {
            node_addr_be: u32::from_ne_bytes(want.node_addr.octets()),
            bridge_ifindex: bridge.as_ref().map_or(0, |i| i.ifindex),
            bridge_addr_be: bridge
                .as_ref()
                .and_then(Interface::addr)
                .map_or(0, |a| u32::from_ne_bytes(a.octets())),
            vxlan_ifindex: vxlan.as_ref().map_or(0, |i| i.ifindex),
            vxlan_addr_be: vxlan
                .as_ref()
                .and_then(Interface::addr)
                .map_or(0, |a| u32::from_ne_bytes(a.octets())),
        };
        if self.node_written != Some(config) {
            self.node.set(0, config, 0).map_err(map_err(NODE_MAP))?;
            self.node_written = Some(config);
        }
        Ok(attached)
    }

    fn attach_tc(&mut self, iface: &Interface) -> Result<(), KernelError> {
        // bpffs refuses names with dots (weft.1).
        let pin = self
            .root
            .join("links")
            .join(format!("tc-{}", iface.name.replace('.', "_")));
        let prog: &mut SchedClassifier = self
            ._bpf
            .program_mut(TC_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| KernelError::Program {
                program: TC_PROGRAM,
                what: "not loaded".into(),
            })?;
        if pin.exists() {
            let fd = prog
                .fd()
                .map_err(|e| KernelError::Program {
                    program: TC_PROGRAM,
                    what: e.to_string(),
                })?
                .as_fd()
                .as_raw_fd();
            match replace_in_link(&pin, fd) {
                Ok(()) => {
                    self.attach.replaced.push(TC_PROGRAM);
                    return Ok(());
                }
                // The interface went away with the old link (recreated
                // since): attach anew.
                Err(e) => {
                    tracing::info!(interface = %iface.name, error = %e, "pinned TC link is stale; attaching anew");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let id = prog
            .attach(&iface.name, TcAttachType::Ingress)
            .map_err(|e| KernelError::Program {
                program: TC_PROGRAM,
                what: format!("attach to {} ingress: {e}", iface.name),
            })?;
        let link = prog.take_link(id).map_err(|e| KernelError::Program {
            program: TC_PROGRAM,
            what: e.to_string(),
        })?;
        let fd_link = FdLink::try_from(link).map_err(|e| KernelError::Program {
            program: TC_PROGRAM,
            what: format!("not a bpf_link (TCX needed): {e}"),
        })?;
        fd_link.pin(&pin).map_err(|e| KernelError::Link {
            path: pin.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.attach.attached.push(TC_PROGRAM);
        Ok(())
    }

    /// Delete the north-south connections to any of `backends` (address,
    /// port, network order): a UDP flow would otherwise keep sending to a
    /// backend that is gone. Returns how many entries were deleted.
    pub fn purge_connections(&mut self, backends: &[(u32, u16)]) -> Result<usize, KernelError> {
        if backends.is_empty() {
            return Ok(0);
        }
        let mut doomed = Vec::new();
        for kv in self.ct.iter() {
            let Ok((k, v)) = kv else { continue };
            let backend = if k.dir == CT_FORWARD {
                (v.addr_a_be, v.port_a_be)
            } else {
                (k.saddr_be, k.sport_be)
            };
            if backends.contains(&backend) {
                doomed.push(k);
            }
        }
        let mut n = 0;
        for k in doomed {
            match self.ct.remove(&k) {
                Ok(()) => n += 1,
                Err(e) if absent(&e) => {}
                Err(e) => return Err(map_err(CT_MAP)(e)),
            }
        }
        Ok(n)
    }

    /// Interfaces the TC program is attached to.
    pub fn tc_interfaces(&self) -> Vec<String> {
        self.tc.keys().cloned().collect()
    }

    /// Whether every program's pinned link is still there (someone removing
    /// the bpffs directory detaches the programs).
    pub fn links_missing(&self) -> Vec<&'static str> {
        SOCKET_PROGRAMS
            .into_iter()
            .filter(|name| !self.root.join("links").join(name).exists())
            .collect()
    }
}

fn typed<K: Pod, V: Pod>(
    bpf: &mut Ebpf,
    map: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, KernelError> {
    let m = bpf.take_map(map).ok_or_else(|| KernelError::Map {
        map,
        source: Box::new(aya::maps::MapError::InvalidName {
            name: map.to_string(),
        }),
    })?;
    BpfHashMap::try_from(m).map_err(|source| KernelError::Map {
        map,
        source: Box::new(source),
    })
}

/// Mount a bpf filesystem at `path` unless it (or the filesystem holding
/// it) already is one.
pub fn ensure_bpffs(path: &Path) -> Result<(), KernelError> {
    let err = |source| KernelError::Bpffs {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    if is_bpffs(path).map_err(err)? {
        return Ok(());
    }
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: valid NUL-terminated strings; mount(2) does not keep them.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Remove what an eBPF dataplane pinned under `bpffs` (links first, which
/// detaches the programs, then the maps): for an agent that now runs
/// another dataplane. Returns whether there was anything.
pub fn remove_pins(bpffs: &Path) -> std::io::Result<bool> {
    let links = bpffs.join("links");
    let mut found = false;
    if links.exists() {
        // Detach first: removing the pins alone frees the links later.
        for e in std::fs::read_dir(&links)?.flatten() {
            if let Err(err) = detach_link(&e.path()) {
                tracing::warn!(pin = %e.path().display(), %err, "detaching a pinned link");
            }
        }
        std::fs::remove_dir_all(&links)?;
        found = true;
    }
    let Ok(entries) = std::fs::read_dir(bpffs) else {
        return Ok(found);
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("maps-v") {
            std::fs::remove_dir_all(e.path())?;
            found = true;
        }
    }
    Ok(found)
}

/// Maps of an earlier ABI version: their programs have just been replaced.
fn remove_old_abi_dirs(bpffs: &Path) {
    let current = format!("maps-v{ABI_VERSION}");
    let Ok(entries) = std::fs::read_dir(bpffs) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("maps-v") && name != current {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), %err, "removing maps of an earlier ABI");
            } else {
                tracing::info!(path = %e.path().display(), "removed maps of an earlier ABI");
            }
        }
    }
}

/// BPF_OBJ_GET the pinned link and BPF_LINK_UPDATE it to `prog_fd`: the
/// kernel swaps the program in place.
fn replace_in_link(pin: &Path, prog_fd: i32) -> Result<(), KernelError> {
    let err = |source| KernelError::Link {
        path: pin.to_path_buf(),
        source,
    };
    let link = obj_get(pin).map_err(err)?;
    // union bpf_attr for BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a valid attr; no fd is returned.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdate,
            std::mem::size_of::<LinkUpdate>() as u32,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// BPF_LINK_DETACH the pinned link: the program leaves its hook now. (Only
/// unlinking the pin detaches it later, once the kernel frees the inode
/// after an RCU grace period and a work item, so traffic could still be
/// translated right after a switch away from eBPF.)
fn detach_link(pin: &Path) -> std::io::Result<()> {
    let link = obj_get(pin)?;
    // union bpf_attr for BPF_LINK_DETACH: link_fd (+ zeroed tail).
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
        _pad: u32,
    }
    let attr = LinkDetach {
        link_fd: link.as_raw_fd() as u32,
        _pad: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a valid attr; no fd is returned.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &attr as *const LinkDetach,
            std::mem::size_of::<LinkDetach>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// BPF_OBJ_GET: a new fd for the object pinned at `pin`.
fn obj_get(pin: &Path) -> std::io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd.
    // The kernel rejects (EINVAL) an attr whose bytes past the command's
    // fields are not zero: the tail padding is an explicit, zeroed field.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a valid attr; returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_OBJ_GET: i64 = 7;
const BPF_LINK_UPDATE: i64 = 29;
const BPF_LINK_DETACH: i64 = 34;

/// The kernel's answer to a delete of a key that is not there: fine (deletes
/// are idempotent; an LRU or a concurrent agent may have removed it).
fn absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map {
        map,
        source: Box::new(source),
    }
}

impl MapStore for Kernel {
    type Error = KernelError;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), KernelError> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(SERVICES_MAP))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), KernelError> {
        match self.services.remove(&key) {
            Err(e) if !absent(&e) => Err(map_err(SERVICES_MAP)(e)),
            _ => Ok(()),
        }
    }
    fn put_backend(&mut self, key: BackendKey, value: Backend) -> Result<(), KernelError> {
        self.backends
            .insert(key, value, 0)
            .map_err(map_err(BACKENDS_MAP))
    }
    fn delete_backend(&mut self, key: BackendKey) -> Result<(), KernelError> {
        match self.backends.remove(&key) {
            Err(e) if !absent(&e) => Err(map_err(BACKENDS_MAP)(e)),
            _ => Ok(()),
        }
    }
    fn put_maglev(&mut self, set_id: u32, table: &MaglevTable) -> Result<(), KernelError> {
        self.maglev
            .insert(set_id, table, 0)
            .map_err(map_err(MAGLEV_MAP))
    }
    fn delete_maglev(&mut self, set_id: u32) -> Result<(), KernelError> {
        match self.maglev.remove(&set_id) {
            Err(e) if !absent(&e) => Err(map_err(MAGLEV_MAP)(e)),
            _ => Ok(()),
        }
    }
    fn put_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), KernelError> {
        self.affinity_match
            .insert(key, 1, 0)
            .map_err(map_err(AFFINITY_MATCH_MAP))
    }
    fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), KernelError> {
        match self.affinity_match.remove(&key) {
            Err(e) if !absent(&e) => Err(map_err(AFFINITY_MATCH_MAP)(e)),
            _ => Ok(()),
        }
    }
    fn image(&self) -> Result<Image, KernelError> {
        let mut image = Image::default();
        for kv in self.services.iter() {
            let (k, v) = kv.map_err(map_err(SERVICES_MAP))?;
            image.services.insert(k, v);
        }
        for kv in self.backends.iter() {
            let (k, v) = kv.map_err(map_err(BACKENDS_MAP))?;
            image.backends.insert(k, v);
        }
        for kv in self.maglev.iter() {
            let (k, v) = kv.map_err(map_err(MAGLEV_MAP))?;
            image.maglev.insert(k, v.indices.to_vec());
        }
        for k in self.affinity_match.keys() {
            image
                .affinity_match
                .insert(k.map_err(map_err(AFFINITY_MATCH_MAP))?);
        }
        Ok(image)
    }
}

/// This namespace's interfaces with their first IPv4 address.
pub fn interfaces() -> std::io::Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let addr = if !ifa.ifa_addr.is_null()
            // SAFETY: ifa_addr points at a sockaddr of at least sa_family.
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            Some(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        } else {
            None
        };
        match out.iter_mut().find(|i| i.name == name) {
            Some(i) => i.addrs.extend(addr),
            None => {
                let c = CString::new(name.clone()).unwrap_or_default();
                // SAFETY: a NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
                out.push(Interface {
                    name,
                    ifindex,
                    addrs: addr.into_iter().collect(),
                });
            }
        }
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
