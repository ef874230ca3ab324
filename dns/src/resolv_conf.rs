//! The node's upstream resolvers, read from a resolv.conf.
//!
//! Owns the choice of which `nameserver` lines the forwarder may use. A
//! node-local cluster DNS forwarding to a loopback stub (systemd-resolved's
//! 127.0.0.53, a local dnsmasq) or to its own listening address would loop,
//! so those are rejected, and every rejection says why for the operator.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};

/// What a resolv.conf says that the forwarder needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// Usable upstream servers, in file order, port 53, without duplicates.
    pub upstreams: Vec<SocketAddr>,
    /// `nameserver` addresses that were refused, with the reason.
    pub rejected: Vec<(IpAddr, &'static str)>,
    /// The search list: the last `search` or `domain` line wins (as in glibc).
    pub search: Vec<String>,
    /// Every `options` token, in file order (`ndots:5`, `timeout:2`, ...).
    pub options: Vec<String>,
}

/// A resolv.conf that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResolvConfError {
    #[error("reading the resolver configuration {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub const REASON_LOOPBACK: &str =
    "loopback address: forwarding to a local stub resolver from the node's DNS would loop";
pub const REASON_OWN: &str = "the cluster DNS server's own address: forwarding to it would loop";
pub const REASON_UNSPECIFIED: &str = "unspecified address (means this host): would loop";
pub const REASON_MULTICAST: &str = "multicast address is not a unicast resolver";
pub const REASON_NO_SCOPE: &str = "IPv6 link-local address without a %interface scope";
pub const REASON_BAD_SCOPE: &str = "IPv6 scope names no interface on this host";
pub const REASON_SCOPE_NOT_LINK_LOCAL: &str = "scope id on an address that is not IPv6 link-local";

/// Parses resolv.conf text; never fails: junk lines are ignored.
pub fn parse(text: &str) -> ResolvConf {
    parse_excluding(text, &[])
}

/// Like [`parse`], also rejecting the server's own addresses (the cluster
/// DNS service address and the listening addresses).
pub fn parse_excluding(text: &str, own: &[IpAddr]) -> ResolvConf {
    parse_with(text, own, &if_nametoindex)
}

/// Reads and parses a resolv.conf (usually /etc/resolv.conf).
pub fn load(path: impl AsRef<Path>) -> Result<ResolvConf, ResolvConfError> {
    load_excluding(path, &[])
}

/// Like [`load`], rejecting the server's own addresses as [`parse_excluding`].
pub fn load_excluding(
    path: impl AsRef<Path>,
    own: &[IpAddr],
) -> Result<ResolvConf, ResolvConfError> {
    let path = path.as_ref();
    let text = fs::read_to_string(path).map_err(|source| ResolvConfError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_excluding(&text, own))
}

/// The interface index of a scope name in this network namespace, as
/// glibc resolves `%eth0` (the kernel validates the name).
fn if_nametoindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; nothing is kept past the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

fn parse_with(text: &str, own: &[IpAddr], ifindex: &dyn Fn(&str) -> Option<u32>) -> ResolvConf {
    let mut rc = ResolvConf::default();
    for line in text.lines() {
        // Comments start at `#` or `;`, at the start of a line or (leniently)
        // after a value.
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(keyword) = words.next() else {
            continue;
        };
        match keyword {
            "nameserver" => {
                if let Some(addr) = words.next() {
                    nameserver(&mut rc, addr, own, ifindex);
                }
            }
            "search" | "domain" => {
                let most = if keyword == "domain" { 1 } else { usize::MAX };
                let list: Vec<String> = words.take(most).map(str::to_owned).collect();
                if !list.is_empty() {
                    rc.search = list;
                }
            }
            "options" => rc.options.extend(words.map(str::to_owned)),
            _ => tracing::debug!(line, "resolv.conf: ignoring an unknown line"),
        }
    }
    rc
}

fn nameserver(
    rc: &mut ResolvConf,
    text: &str,
    own: &[IpAddr],
    ifindex: &dyn Fn(&str) -> Option<u32>,
) {
    let (addr_text, scope) = match text.split_once('%') {
        Some((addr, scope)) => (addr, Some(scope)),
        None => (text, None),
    };
    let Ok(ip) = addr_text.parse::<IpAddr>() else {
        tracing::debug!(nameserver = text, "resolv.conf: not an IP address, ignored");
        return;
    };
    // `::ffff:127.0.0.53` is the same loop as 127.0.0.53.
    let canonical = ip.to_canonical();
    let why = if canonical.is_loopback() {
        Some(REASON_LOOPBACK)
    } else if canonical.is_unspecified() {
        Some(REASON_UNSPECIFIED)
    } else if canonical.is_multicast() {
        Some(REASON_MULTICAST)
    } else if own.iter().any(|o| o.to_canonical() == canonical) {
        Some(REASON_OWN)
    } else {
        None
    };
    if let Some(why) = why {
        rc.rejected.push((ip, why));
        return;
    }
    let addr = match (ip, scope) {
        (IpAddr::V6(v6), Some(scope)) if v6.is_unicast_link_local() => {
            let index = scope.parse::<u32>().ok().or_else(|| ifindex(scope));
            match index {
                Some(index) if index != 0 => SocketAddr::V6(SocketAddrV6::new(v6, 53, 0, index)),
                _ => {
                    rc.rejected.push((ip, REASON_BAD_SCOPE));
                    return;
                }
            }
        }
        (IpAddr::V6(v6), None) if v6.is_unicast_link_local() => {
            rc.rejected.push((ip, REASON_NO_SCOPE));
            return;
        }
        (_, Some(_)) => {
            rc.rejected.push((ip, REASON_SCOPE_NOT_LINK_LOCAL));
            return;
        }
        (ip, None) => SocketAddr::new(ip, 53),
    };
    if !rc.upstreams.contains(&addr) {
        rc.upstreams.push(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_ifindex(name: &str) -> Option<u32> {
        match name {
            "eth0" => Some(2),
            _ => None,
        }
    }

    fn p(text: &str, own: &[IpAddr]) -> ResolvConf {
        parse_with(text, own, &fake_ifindex)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The rejected addresses as text, with their reasons.
    fn rejected(rc: &ResolvConf) -> Vec<(String, &'static str)> {
        rc.rejected
            .iter()
            .map(|(ip, why)| (ip.to_string(), *why))
            .collect()
    }

    #[test]
    fn nameservers_search_options_and_comments() {
        let rc = p(
            "# generated by something\n\
             ; another comment\n\
             nameserver 198.19.255.1\n\
             nameserver 2001:db8::53   # inline comment\n\
             \n\
             search default.svc.cluster.local svc.cluster.local cluster.local\n\
             options ndots:5 timeout:2\n\
             options attempts:3\n\
             sortlist 130.155.160.0/255.255.240.0\n\
             this is junk\n\
             nameserver\n\
             nameserver not-an-address\n\
             nameserver 198.19.255.1\n",
            &[],
        );
        assert_eq!(
            rc.upstreams,
            vec![sa("198.19.255.1:53"), sa("[2001:db8::53]:53")]
        );
        assert!(rc.rejected.is_empty());
        assert_eq!(
            rc.search,
            vec![
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(rc.options, vec!["ndots:5", "timeout:2", "attempts:3"]);
    }

    #[test]
    fn loopback_and_unusable_addresses_are_rejected_with_a_reason() {
        let rc = p(
            "nameserver 127.0.0.53\n\
             nameserver 127.1.2.3\n\
             nameserver ::1\n\
             nameserver ::ffff:127.0.0.1\n\
             nameserver 0.0.0.0\n\
             nameserver ::\n\
             nameserver 224.0.0.251\n\
             nameserver 198.19.255.2\n",
            &[],
        );
        assert_eq!(rc.upstreams, vec![sa("198.19.255.2:53")]);
        assert_eq!(
            rejected(&rc),
            vec![
                ("127.0.0.53".to_string(), REASON_LOOPBACK),
                ("127.1.2.3".to_string(), REASON_LOOPBACK),
                ("::1".to_string(), REASON_LOOPBACK),
                ("::ffff:127.0.0.1".to_string(), REASON_LOOPBACK),
                ("0.0.0.0".to_string(), REASON_UNSPECIFIED),
                ("::".to_string(), REASON_UNSPECIFIED),
                ("224.0.0.251".to_string(), REASON_MULTICAST),
            ]
        );
    }

    #[test]
    fn the_servers_own_addresses_are_rejected() {
        let own: Vec<IpAddr> = vec![
            "198.19.0.10".parse().unwrap(),
            "2001:db8::a".parse().unwrap(),
        ];
        let rc = p(
            "nameserver 198.19.0.10\nnameserver 2001:db8::a\nnameserver 198.19.255.3\n",
            &own,
        );
        assert_eq!(rc.upstreams, vec![sa("198.19.255.3:53")]);
        assert_eq!(
            rc.rejected,
            vec![(own[0], REASON_OWN), (own[1], REASON_OWN)]
        );
    }

    #[test]
    fn scoped_link_local_ipv6() {
        let rc = p(
            "nameserver fe80::1%eth0\n\
             nameserver fe80::2%7\n\
             nameserver fe80::3\n\
             nameserver fe80::4%nosuchif\n\
             nameserver 2001:db8::1%eth0\n\
             nameserver 198.19.255.1%eth0\n",
            &[],
        );
        assert_eq!(
            rc.upstreams,
            vec![
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 2)),
                SocketAddr::V6(SocketAddrV6::new("fe80::2".parse().unwrap(), 53, 0, 7)),
            ]
        );
        assert_eq!(
            rejected(&rc),
            vec![
                ("fe80::3".to_string(), REASON_NO_SCOPE),
                ("fe80::4".to_string(), REASON_BAD_SCOPE),
                ("2001:db8::1".to_string(), REASON_SCOPE_NOT_LINK_LOCAL),
                ("198.19.255.1".to_string(), REASON_SCOPE_NOT_LINK_LOCAL),
            ]
        );
    }

    #[test]
    fn last_search_or_domain_line_wins() {
        assert_eq!(p("search a b\ndomain c d\n", &[]).search, vec!["c"]);
        assert_eq!(p("domain c\nsearch a b\n", &[]).search, vec!["a", "b"]);
        // An empty `search` does not clear the list.
        assert_eq!(p("search a\nsearch\n", &[]).search, vec!["a"]);
    }

    #[test]
    fn systemd_resolved_stub_leaves_no_upstream() {
        let rc = parse(
            "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\n\
             nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n",
        );
        assert!(rc.upstreams.is_empty());
        assert_eq!(rc.rejected.len(), 1);
        assert_eq!(rc.options, vec!["edns0", "trust-ad"]);
    }

    #[test]
    fn the_real_interface_lookup() {
        // Every network namespace has a loopback interface.
        assert!(if_nametoindex("lo").is_some());
        assert_eq!(if_nametoindex("../../etc"), None);
        assert_eq!(if_nametoindex(""), None);
        assert_eq!(if_nametoindex(".."), None);
        assert_eq!(if_nametoindex("lo\0"), None);
        assert_eq!(if_nametoindex("a-name-longer-than-ifnamsiz"), None);
    }

    #[test]
    fn load_names_the_path_on_error_and_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("weft-resolv-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.conf");
        let err = load(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.conf"), "{err}");

        let file = dir.join("resolv.conf");
        fs::write(&file, "nameserver 198.19.255.9\nnameserver 198.19.0.10\n").unwrap();
        let rc = load_excluding(&file, &["198.19.0.10".parse().unwrap()]).unwrap();
        assert_eq!(rc.upstreams, vec![sa("198.19.255.9:53")]);
        assert_eq!(rc.rejected.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
