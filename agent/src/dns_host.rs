//! The node's cluster DNS: the weft-dns server embedded in the agent, fed
//! from the view the agent already follows, answering on the cluster DNS
//! address inside the node.
//!
//! The address (e.g. 198.19.0.10) is put on a dummy link `weft-dns` (a
//! port-less bridge where the kernel has no dummy driver) in the
//! node's network namespace, so pods' queries (routed to their gateway on
//! weft0) are delivered locally: they never cross the network or a
//! conntrack NAT. The service dataplanes leave that address alone (see
//! `PlanConfig::local_dns`). The server binds that address only.

use crate::sync::{SharedChanges, SharedView};
use futures_util::TryStreamExt;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::watch;
use weft_dns::feed::Feed;
use weft_dns::ClusterDns;

/// The dummy link that holds the cluster DNS address.
pub const DNS_LINK: &str = "weft-dns";

/// Why the node's DNS could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsHostError {
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("opening netlink: {0}")]
    Open(#[source] std::io::Error),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DnsHostError {
    let what = what.into();
    move |source| DnsHostError::Netlink { what, source }
}

/// Make `ip` a local address of this namespace on the `weft-dns` dummy link
/// (created and set up if missing). Idempotent.
pub async fn ensure_address(ip: IpAddr) -> Result<(), DnsHostError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DnsHostError::Open)?;
    let task = tokio::spawn(conn);
    let result = async {
        let index = match link_index(&handle).await? {
            Some(i) => i,
            None => {
                let dummy = handle
                    .link()
                    .add(rtnetlink::LinkDummy::new(DNS_LINK).up().build())
                    .execute()
                    .await;
                match dummy {
                    Ok(()) => {}
                    // No dummy driver in this kernel: a bridge without
                    // ports holds a local address just as well.
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
                        tracing::info!(link = DNS_LINK, "no dummy link support; using a port-less bridge");
                        handle
                            .link()
                            .add(rtnetlink::LinkBridge::new(DNS_LINK).up().build())
                            .execute()
                            .await
                            .map_err(nl(format!("creating bridge {DNS_LINK}")))?;
                    }
                    Err(e) => return Err(nl(format!("creating link {DNS_LINK}"))(e)),
                }
                link_index(&handle)
                    .await?
                    .ok_or_else(|| DnsHostError::Open(std::io::Error::other(format!("{DNS_LINK} vanished after creation"))))?
            }
        };
        handle
            .link()
            .change(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {DNS_LINK} up")))?;
        let mut addrs = handle.address().get().set_link_index_filter(index).execute();
        let mut have = false;
        while let Some(m) = addrs.try_next().await.map_err(nl(format!("listing addresses of {DNS_LINK}")))? {
            have |= m.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(x) if *x == ip)
            });
        }
        if !have {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            handle
                .address()
                .add(index, ip, prefix)
                .execute()
                .await
                .map_err(nl(format!("adding {ip}/{prefix} to {DNS_LINK}")))?;
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

async fn link_index(handle: &rtnetlink::Handle) -> Result<Option<u32>, DnsHostError> {
    let mut links = handle
        .link()
        .get()
        .match_name(DNS_LINK.to_string())
        .execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("looking up {DNS_LINK}"))(e)),
    }
}

/// Keep `dns`'s zone in step with the view: on every new revision, apply
/// what the stream said changed (everything after a reset) and publish.
pub async fn follow(
    dns: Arc<ClusterDns>,
    view: SharedView,
    mut revs: watch::Receiver<u64>,
    changes: SharedChanges,
) {
    let mut feed = Feed::default();
    loop {
        let changed = crate::sync::take(&changes);
        if !changed.is_empty() {
            let started = std::time::Instant::now();
            let stats = {
                let v = view.read().unwrap_or_else(|p| p.into_inner());
                weft_dns::feed::publish(&dns, &mut feed, &v, &changed)
            };
            tracing::debug!(
                services = stats.services_changed,
                pods = stats.pods_changed,
                took_us = started.elapsed().as_micros() as u64,
                "cluster DNS zone updated"
            );
        }
        if revs.changed().await.is_err() {
            return;
        }
    }
}
