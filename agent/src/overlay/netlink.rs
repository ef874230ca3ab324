//! The overlay's kernel side over rtnetlink: the bridge, the VXLAN device,
//! and per-peer routes, permanent neighbours and FDB entries. Works in the
//! network namespace of the thread that created the connection.

use super::{
    Fdb, LinkState, Links, LinksError, Mac, Neighbour, Observed, Op, Route, VxlanParams, BRIDGE,
    VXLAN,
};
use futures_util::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};

/// rtnetlink-backed [`Links`].
pub struct NetlinkLinks {
    handle: Handle,
}

impl NetlinkLinks {
    /// Open a netlink connection in the calling thread's network namespace and
    /// drive it on the current tokio runtime.
    pub fn new() -> Result<NetlinkLinks, LinksError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| LinksError::Kernel {
            op: "open netlink socket".into(),
            reason: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(NetlinkLinks { handle })
    }

    /// The MTU of the link that holds `ip` (the underlay), if any.
    pub async fn mtu_of_address(&self, ip: Ipv4Addr) -> Result<Option<u32>, LinksError> {
        let mut s = self.handle.address().get().execute();
        let mut index = None;
        while let Some(m) = s.try_next().await.map_err(|e| nl("list addresses", e))? {
            if m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(x)) if *x == ip))
            {
                index = Some(m.header.index);
            }
        }
        let Some(index) = index else { return Ok(None) };
        let mut l = self.handle.link().get().match_index(index).execute();
        match l.try_next().await.map_err(|e| nl("get underlay link", e))? {
            Some(m) => Ok(Some(link_state(&m).mtu)),
            None => Ok(None),
        }
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, LinksError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            // ENODEV: no such link
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
            Err(source) => Err(nl(format!("get link {name}"), source)),
        }
    }

    async fn index(&self, name: &str, op: &Op) -> Result<u32, LinksError> {
        self.link(name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| LinksError::Kernel {
                op: format!("{op:?}"),
                reason: format!("{name} does not exist"),
            })
    }

    async fn add_addr(&self, dev: &str, a: &Ipv4Network, op: &Op) -> Result<(), LinksError> {
        let index = self.index(dev, op).await?;
        self.handle
            .address()
            .add(index, IpAddr::V4(a.ip()), a.prefix())
            .execute()
            .await
            .map_err(|e| nl(format!("{op:?}"), e))
    }

    async fn del_addr(&self, dev: &str, a: &Ipv4Network, op: &Op) -> Result<(), LinksError> {
        let index = self.index(dev, op).await?;
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl(format!("{op:?}"), e))? {
            let matches = m.header.prefix_len == a.prefix()
                && m.attributes.iter().any(
                    |x| matches!(x, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == a.ip()),
                );
            if matches {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|e| nl(format!("{op:?}"), e))?;
            }
        }
        Ok(())
    }

    async fn addrs(&self, index: u32) -> Result<Vec<Ipv4Network>, LinksError> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl("list addresses", e))? {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    if let Ok(n) = Ipv4Network::new(*ip, m.header.prefix_len) {
                        out.push(n);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn nl(op: impl Into<String>, source: rtnetlink::Error) -> LinksError {
    LinksError::Netlink {
        op: op.into(),
        source,
    }
}

fn link_state(m: &LinkMessage) -> LinkState {
    let mut st = LinkState {
        index: m.header.index,
        up: m.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(mtu) => st.mtu = *mtu,
            LinkAttribute::Address(mac) if mac.len() == 6 => {
                let mut m6 = [0u8; 6];
                m6.copy_from_slice(mac);
                st.mac = Some(m6);
            }
            _ => {}
        }
    }
    st
}

fn vxlan_params(m: &LinkMessage) -> Option<VxlanParams> {
    let mut p = VxlanParams {
        // The kernel's defaults when an attribute is absent.
        learning: true,
        ..Default::default()
    };
    let mut is_vxlan = false;
    for a in &m.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                match i {
                    LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                    LinkInfo::Data(InfoData::Vxlan(data)) => {
                        for d in data {
                            match d {
                                InfoVxlan::Id(v) => p.vni = *v,
                                InfoVxlan::Port(v) => p.port = *v,
                                InfoVxlan::Local(ip) => p.local = Some(*ip),
                                InfoVxlan::Learning(l) => p.learning = *l,
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    is_vxlan.then_some(p)
}

fn mac_of(attrs: &[NeighbourAttribute]) -> Option<Mac> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
            let mut m6 = [0u8; 6];
            m6.copy_from_slice(m);
            Some(m6)
        }
        _ => None,
    })
}

fn v4_of(attrs: &[NeighbourAttribute]) -> Option<Ipv4Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // FDB entries (bridge family) carry the remote VTEP as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
            Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        _ => None,
    })
}

fn route_msg(r: &Route, oif: u32) -> RouteMessage {
    let mut m = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix())
        .gateway(r.via)
        .output_interface(oif)
        .build();
    m.header.flags |= RouteFlags::Onlink;
    m
}

impl Links for NetlinkLinks {
    async fn observe(&self) -> Result<Observed, LinksError> {
        let mut o = Observed::default();
        if let Some(b) = self.link(BRIDGE).await? {
            let mut st = link_state(&b);
            st.addrs = self.addrs(st.index).await?;
            o.bridge = Some(st);
        }
        let Some(v) = self.link(VXLAN).await? else {
            return Ok(o);
        };
        let mut st = link_state(&v);
        let index = st.index;
        st.addrs = self.addrs(index).await?;
        let Some(params) = vxlan_params(&v) else {
            // Something else is named weft.1: treat it as a wrong device to replace.
            o.vxlan = Some((st, VxlanParams::default()));
            return Ok(o);
        };
        o.vxlan = Some((st, params));

        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(m) = routes.try_next().await.map_err(|e| nl("list routes", e))? {
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if oif != Some(index) {
                continue;
            }
            if let (Some(d), Some(g)) = (dst, gw) {
                if let Ok(dst) = Ipv4Network::new(d, m.header.destination_prefix_length) {
                    o.routes.push(Route { dst, via: g });
                }
            }
        }

        let mut neigh = self.handle.neighbours().get().execute();
        while let Some(m) = neigh
            .try_next()
            .await
            .map_err(|e| nl("list neighbours", e))?
        {
            if m.header.ifindex != index {
                continue;
            }
            match m.header.family {
                AddressFamily::Inet if m.header.state == NeighbourState::Permanent => {
                    if let (Some(ip), Some(mac)) = (v4_of(&m.attributes), mac_of(&m.attributes)) {
                        o.neighbours.push(Neighbour { ip, mac });
                    }
                }
                AddressFamily::Bridge => {
                    if let (Some(dst), Some(mac)) = (v4_of(&m.attributes), mac_of(&m.attributes)) {
                        o.fdb.push(Fdb { mac, dst });
                    }
                }
                _ => {}
            }
        }
        let mut fdb = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(m) = fdb.try_next().await.map_err(|e| nl("list fdb", e))? {
            if m.header.ifindex != index {
                continue;
            }
            if let (Some(dst), Some(mac)) = (v4_of(&m.attributes), mac_of(&m.attributes)) {
                let f = Fdb { mac, dst };
                if !o.fdb.contains(&f) {
                    o.fdb.push(f);
                }
            }
        }
        Ok(o)
    }

    async fn apply(&self, op: &Op) -> Result<(), LinksError> {
        let what = || format!("{op:?}");
        match op {
            Op::CreateBridge { mtu, mac } => self
                .handle
                .link()
                .add(
                    LinkBridge::new(BRIDGE)
                        .mtu(*mtu)
                        .address(mac.to_vec())
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl(what(), e)),
            Op::SetBridge { mtu, mac } => {
                let index = self.index(BRIDGE, op).await?;
                self.handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .mtu(*mtu)
                            .address(mac.to_vec())
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::AddBridgeAddr(a) => self.add_addr(BRIDGE, a, op).await,
            Op::DelBridgeAddr(a) => self.del_addr(BRIDGE, a, op).await,
            Op::AddVxlanAddr(a) => self.add_addr(VXLAN, a, op).await,
            Op::DelVxlanAddr(a) => self.del_addr(VXLAN, a, op).await,
            Op::DeleteVxlan => {
                let index = self.index(VXLAN, op).await?;
                self.handle
                    .link()
                    .del(index)
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::CreateVxlan {
                vni,
                port,
                local,
                mtu,
                mac,
            } => self
                .handle
                .link()
                .add(
                    LinkVxlan::new(VXLAN, *vni)
                        .port(*port)
                        .local(*local)
                        .learning(false)
                        .mtu(*mtu)
                        .address(mac.to_vec())
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| nl(what(), e)),
            Op::SetVxlan { mtu } => {
                let index = self.index(VXLAN, op).await?;
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).mtu(*mtu).up().build())
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::AddRoute(r) => {
                let index = self.index(VXLAN, op).await?;
                self.handle
                    .route()
                    .add(route_msg(r, index))
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::DelRoute(r) => {
                let index = self.index(VXLAN, op).await?;
                self.handle
                    .route()
                    .del(route_msg(r, index))
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::AddNeighbour(n) => {
                let index = self.index(VXLAN, op).await?;
                self.handle
                    .neighbours()
                    .add(index, IpAddr::V4(n.ip))
                    .link_layer_address(&n.mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::DelNeighbour(n) => {
                let index = self.index(VXLAN, op).await?;
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = index;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        n.ip,
                    )));
                self.handle
                    .neighbours()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::AddFdb(f) => {
                let index = self.index(VXLAN, op).await?;
                self.handle
                    .neighbours()
                    .add_bridge(index, &f.mac)
                    .destination(IpAddr::V4(f.dst))
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
            Op::DelFdb(f) => {
                let index = self.index(VXLAN, op).await?;
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = index;
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(f.mac.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        f.dst,
                    )));
                self.handle
                    .neighbours()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|e| nl(what(), e))
            }
        }
    }
}
