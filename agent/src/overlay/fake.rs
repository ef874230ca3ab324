//! A simulated kernel for the overlay: applies operations to an in-memory
//! [`Observed`] and records them, so reconciliation is testable without
//! privileges.

use super::{LinkState, Links, LinksError, Observed, Op, VxlanParams};
use std::sync::Mutex;

#[derive(Default)]
pub struct FakeLinks {
    state: Mutex<Observed>,
    applied: Mutex<Vec<Op>>,
}

impl FakeLinks {
    /// Change the simulated kernel as someone else would (e.g. `ip route del`).
    pub fn mutate(&self, f: impl FnOnce(&mut Observed)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn state(&self) -> Observed {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn applied(&self) -> Vec<Op> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn missing(op: &Op, what: &str) -> LinksError {
    LinksError::Kernel {
        op: format!("{op:?}"),
        reason: format!("{what} does not exist"),
    }
}

impl Links for FakeLinks {
    async fn observe(&self) -> Result<Observed, LinksError> {
        Ok(self.state())
    }

    async fn apply(&self, op: &Op) -> Result<(), LinksError> {
        let mut k = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match op {
            Op::CreateBridge { mtu, mac } => {
                k.bridge = Some(LinkState {
                    index: 10,
                    mtu: *mtu,
                    up: true,
                    mac: Some(*mac),
                    addrs: vec![],
                })
            }
            Op::SetBridge { mtu, mac } => {
                let b = k.bridge.as_mut().ok_or_else(|| missing(op, "bridge"))?;
                b.mtu = *mtu;
                b.mac = Some(*mac);
                b.up = true;
            }
            Op::AddBridgeAddr(a) => k
                .bridge
                .as_mut()
                .ok_or_else(|| missing(op, "bridge"))?
                .addrs
                .push(*a),
            Op::DelBridgeAddr(a) => k
                .bridge
                .as_mut()
                .ok_or_else(|| missing(op, "bridge"))?
                .addrs
                .retain(|x| x != a),
            Op::AddVxlanAddr(a) => k
                .vxlan
                .as_mut()
                .ok_or_else(|| missing(op, "vxlan"))?
                .0
                .addrs
                .push(*a),
            Op::DelVxlanAddr(a) => k
                .vxlan
                .as_mut()
                .ok_or_else(|| missing(op, "vxlan"))?
                .0
                .addrs
                .retain(|x| x != a),
            Op::DeleteVxlan => {
                k.vxlan = None;
                k.routes.clear();
                k.neighbours.clear();
                k.fdb.clear();
            }
            Op::CreateVxlan {
                vni,
                port,
                local,
                mtu,
                mac,
            } => {
                k.vxlan = Some((
                    LinkState {
                        index: 11,
                        mtu: *mtu,
                        up: true,
                        mac: Some(*mac),
                        addrs: vec![],
                    },
                    VxlanParams {
                        vni: *vni,
                        port: *port,
                        local: Some(*local),
                        learning: false,
                    },
                ))
            }
            Op::SetVxlan { mtu } => {
                let (l, _) = k.vxlan.as_mut().ok_or_else(|| missing(op, "vxlan"))?;
                l.mtu = *mtu;
                l.up = true;
            }
            Op::AddRoute(r) => {
                k.vxlan.as_ref().ok_or_else(|| missing(op, "vxlan"))?;
                k.routes.push(r.clone())
            }
            Op::DelRoute(r) => k.routes.retain(|x| x != r),
            Op::AddNeighbour(n) => k.neighbours.push(n.clone()),
            Op::DelNeighbour(n) => k.neighbours.retain(|x| x != n),
            Op::AddFdb(f) => k.fdb.push(f.clone()),
            Op::DelFdb(f) => k.fdb.retain(|x| x != f),
        }
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(op.clone());
        Ok(())
    }
}
