//! `POST /v1/bootstrap-lease`: one master at a time applies the cluster objects (the join
//! token's Secret, the node-bootstrap RBAC, cluster-info); once one completed, nobody does again.

use proto::Role;
use proto::wire::{ErrorCode, LeaseAction, LeaseResponse};

use super::records::{self, LeaseRecord, NodeRecord};
use super::{ApiError, Fleet, now};

/// How long a master may hold the bootstrap lease without completing.
const LEASE_TTL: time::Duration = time::Duration::minutes(5);

impl Fleet {
    /// A master's `acquire` or `complete` of the bootstrap lease; `objects` makes the cluster
    /// objects for a master that is granted it.
    pub async fn lease(
        &self,
        node: &NodeRecord,
        action: LeaseAction,
        objects: impl FnOnce() -> Vec<serde_json::Value>,
    ) -> Result<LeaseResponse, ApiError> {
        if node.role != Role::Master {
            return Err(ApiError::new(ErrorCode::BadRequest, "only masters take the bootstrap lease"));
        }
        let decided = self
            .transact(txn!(|tx| {
                let t = now();
                let mut lease: LeaseRecord = tx.get(records::LEASE).await?.unwrap_or_default();
                let free = lease.holder.is_none()
                    || lease.expires.is_some_and(|e| e < t)
                    || lease.holder.as_deref() == Some(&node.name);
                let granted = match action {
                    LeaseAction::Acquire if lease.completed || !free => return Ok((lease, false)),
                    LeaseAction::Acquire => {
                        lease.holder = Some(node.name.clone());
                        lease.expires = Some(t + LEASE_TTL);
                        true
                    }
                    LeaseAction::Complete if lease.holder.as_deref() == Some(&node.name) => {
                        lease.completed = true;
                        false
                    }
                    LeaseAction::Complete => {
                        return Err(ApiError::new(
                            ErrorCode::BadRequest,
                            format!("{} does not hold the bootstrap lease", node.name),
                        ));
                    }
                };
                tx.put(records::LEASE, &lease);
                tx.audit("lease", &[("node", &node.name), ("action", if granted { "granted" } else { "completed" })]);
                Ok((lease, granted))
            }))
            .await?;
        let (lease, granted) = decided;
        let objects = if granted { objects() } else { vec![] };
        Ok(LeaseResponse { granted, completed: lease.completed, holder: lease.holder, objects })
    }
}
