//! The operator's decisions and views (`imgbuild nodes`): approve a pending machine's key,
//! reset a node so that a machine may enroll as it again, revoke a node's enrollment.

use std::collections::BTreeMap;

use proto::Role;
use proto::wire::{ApproveRequest, ErrorCode, MachineState, NodeStatus, RevokeRequest, RevokeResponse};

use super::enroll::forget_pending;
use super::records::{self, MachineRecord, NodeRecord};
use super::{ApiError, Fleet, now};

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

impl Fleet {
    /// Every machine the server has seen, with its node and last report.
    pub async fn status(&self) -> Result<Vec<NodeStatus>, ApiError> {
        let nodes: BTreeMap<String, NodeRecord> =
            self.list::<NodeRecord>("nodes/").await?.into_iter().map(|n| (n.name.clone(), n)).collect();
        let mut out: Vec<NodeStatus> = self
            .list::<MachineRecord>("machines/")
            .await?
            .iter()
            .map(|m| records::status(m, m.node.as_ref().and_then(|n| nodes.get(n))))
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node).then(a.machine.cmp(&b.machine)));
        Ok(out)
    }

    /// The record of node `name`, if it exists.
    pub async fn node(&self, name: &str) -> Result<Option<NodeRecord>, ApiError> {
        self.record(&records::node_key(name)).await
    }

    /// The machine an operator names: its identity key, one of its MACs, or its UUID.
    async fn find_machine(&self, machine: &str) -> Result<MachineRecord, ApiError> {
        let wanted = machine.to_ascii_lowercase();
        let mac = proto::wire::normalize_mac(machine);
        self.list::<MachineRecord>("machines/")
            .await?
            .into_iter()
            .find(|m| {
                m.key == machine
                    || mac.as_ref().is_some_and(|mac| m.identity.macs.contains(mac))
                    || m.identity.uuid.as_deref() == Some(wanted.as_str())
            })
            .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, format!("no machine {machine} has asked to enroll")))
    }

    /// `imgbuild nodes approve`: a pending machine's key may bind as the inventory's node for
    /// that machine, or as `name` with `role` (default: worker) when it is not in the inventory.
    pub async fn approve(&self, req: &ApproveRequest) -> Result<NodeStatus, ApiError> {
        let found = self.find_machine(&req.machine).await?;
        let mkey = found.key.clone();
        let inventory = self.cluster.nodes.iter().find(|n| {
            n.uuid.as_ref().is_some_and(|u| found.identity.uuid.as_deref() == Some(u.as_str()))
                || n.mac.as_ref().is_some_and(|mac| found.identity.macs.iter().any(|x| x == mac.as_str()))
        });
        let (name, role) = match inventory {
            Some(n) => {
                if req.name.as_ref().is_some_and(|x| x != &n.name) || req.role.is_some_and(|r| r != n.role) {
                    return Err(bad(format!(
                        "machine {mkey} is inventory node {} ({}); it cannot become another",
                        n.name, n.role
                    )));
                }
                (n.name.clone(), n.role)
            }
            None => {
                let role = req.role.unwrap_or(Role::Worker);
                let name = req
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{role}-{}", &crate::digest::sha256_hex(mkey.as_bytes())[..8]));
                if !crate::cluster::is_dns_label(&name) {
                    return Err(bad(format!("'{name}' is not a valid node name (RFC 1123 label)")));
                }
                if self.cluster.node(&name).is_some() {
                    return Err(bad(format!("{name} is an inventory node's name")));
                }
                (name, role)
            }
        };
        let taken_by_other = self
            .list::<MachineRecord>("machines/")
            .await?
            .iter()
            .any(|m| m.key != mkey && m.node.as_deref() == Some(name.as_str()));
        if taken_by_other {
            return Err(ApiError::new(ErrorCode::BadRequest, format!("node name {name} is taken")));
        }
        let (mkey, name) = (&mkey, &name);
        self.transact(txn!(|tx| {
            let mut rec: MachineRecord =
                tx.get(&records::machine_key(mkey)).await?.ok_or_else(|| bad(format!("machine {mkey} is gone")))?;
            if rec.state != MachineState::Pending {
                return Err(bad(format!("machine {mkey} is {}, not pending", rec.state.as_str())));
            }
            let key = match (&req.key, rec.pending.as_slice()) {
                (Some(k), keys) if keys.iter().any(|p| &p.key == k) => k.clone(),
                (Some(k), _) => return Err(bad(format!("machine {mkey} has not asked with key {k}"))),
                (None, [only]) => only.key.clone(),
                (None, keys) => {
                    let list: Vec<&str> = keys.iter().map(|p| p.key.as_str()).collect();
                    return Err(bad(format!(
                        "machine {mkey} asked with {} keys ({}): give --key with the one its console shows",
                        keys.len(),
                        list.join(", ")
                    )));
                }
            };
            if tx.get::<NodeRecord>(&records::node_key(name)).await?.is_some() {
                return Err(bad(format!("node {name} is bound; `imgbuild nodes reset {name}` first")));
            }
            forget_pending(tx, &rec).await?;
            rec.state = MachineState::Approved;
            rec.approved_key = Some(key.clone());
            rec.pending.retain(|p| p.key == key);
            rec.node = Some(name.clone());
            rec.role = role;
            tx.put(&records::machine_key(mkey), &rec);
            tx.audit("approved", &[("machine", mkey), ("node", name), ("role", role.as_str()), ("key", &key)]);
            Ok(records::status(&rec, None))
        }))
        .await
    }

    /// `imgbuild nodes reset NAME`: the node is unbound, and its machine forgotten; a machine may
    /// then enroll as it again, with a new credential or the operator's approval.
    pub async fn reset(&self, name: &str) -> Result<(), ApiError> {
        self.transact(txn!(|tx| {
            let node: NodeRecord =
                tx.get(&records::node_key(name)).await?.ok_or_else(|| bad(format!("no node {name} is bound")))?;
            tx.delete(&records::node_key(name));
            tx.delete(&records::machine_key(&node.machine));
            tx.audit(
                "reset",
                &[("node", name), ("machine", &node.machine), ("key", &format!("sha256:{}", node.client.spki))],
            );
            Ok(())
        }))
        .await
    }

    /// `imgbuild nodes revoke`: the node's enrollment certificate is refused from its next
    /// request on (by name, or every node that enrolled with a credential).
    pub async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeResponse, ApiError> {
        let names: Vec<String> = match (&req.node, &req.token) {
            (Some(n), None) => vec![n.clone()],
            (None, Some(t)) => self
                .list::<NodeRecord>("nodes/")
                .await?
                .into_iter()
                .filter(|n| n.token.as_deref() == Some(t.as_str()) && n.revoked.is_none())
                .map(|n| n.name)
                .collect(),
            _ => return Err(bad("revoke takes a node or a token id, one of them")),
        };
        for name in &names {
            self.transact(txn!(|tx| {
                let mut node: NodeRecord =
                    tx.get(&records::node_key(name)).await?.ok_or_else(|| bad(format!("no node {name} is bound")))?;
                if node.revoked.is_some() {
                    return Ok(());
                }
                node.revoked = Some(now());
                if let Some(mut m) = tx.get::<MachineRecord>(&records::machine_key(&node.machine)).await? {
                    m.state = MachineState::Revoked;
                    tx.put(&records::machine_key(&node.machine), &m);
                }
                tx.put(&records::node_key(name), &node);
                tx.audit("revoked", &[("node", name), ("token", node.token.as_deref().unwrap_or(""))]);
                Ok(())
            }))
            .await?;
        }
        Ok(RevokeResponse { revoked: names })
    }
}
