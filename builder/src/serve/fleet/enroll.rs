//! `POST /v1/enroll`: a machine proves itself and is bound to a node, for good.
//!
//! What a machine says about itself (MACs, UUID) only selects an inventory entry. What proves it
//! (docs/security.md):
//! - its node credential: one-time, for one inventory entry, delivered out of band in the node's
//!   own payload; binds that entry, whatever its role;
//! - the worker token: an inventory worker, or under `auto-worker` a new worker; never a master,
//!   so never CA material;
//! - nothing: the machine waits as pending, with the key it asked with, until the operator
//!   approves that key; then that key, and only that key, binds.
//!
//! Every CSR here is bound to the TLS connection it came on ([`crate::pki::Csr::verify`]). A node
//! that is bound is never re-bound: another key asking for it is refused, recorded as a conflict
//! on the node, and waits for `imgbuild nodes reset`. Refusals tell the machine only that it was
//! refused; the operator sees why.

use std::net::IpAddr;

use proto::Role;
use proto::wire::{
    Conflict, EnrollRequest, EnrollResponse, EnrollStatus, ErrorCode, MachineIdentity, MachineState, NodeAssignment,
    PROTOCOL_VERSION, Phase, PhaseStatus, Proof,
};

use super::records::{self, MachineRecord, NodeRecord, PendingKey, StoredCert};
use super::{ApiError, Fleet, Tx, now};
use crate::cluster::EnrollPolicy;
use crate::pki::{self, Csr};
use crate::tokens::{TokenRecord, TokenState, TokenUsage};

/// Machines without a credential that may wait for approval, per source address and in all:
/// asking costs an attacker nothing, so what it can make the server keep is bounded.
pub const PENDING_PER_SOURCE: usize = 16;
/// Machines waiting for approval, from every source together.
pub const PENDING_TOTAL: u64 = 1024;

/// What a refusal tells the machine. The inventory is not for whoever asks: which node a MAC
/// belongs to, or that it is bound, is the operator's to see.
const REFUSED: &str =
    "this machine cannot enroll with what it presented; the operator can see why (imgbuild nodes, audit log)";

/// A refusal: what the machine is told, and what the audit log and the operator see.
struct Refusal {
    error: ApiError,
    detail: String,
}

fn refused(detail: impl Into<String>) -> Refusal {
    Refusal { error: ApiError::new(ErrorCode::Refused, REFUSED), detail: detail.into() }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Refusal { detail: String::new(), error }
    }
}

/// How a transaction ended: a decision to commit, or a refusal that may still record something
/// (a conflict on the node it tried to take).
enum Decision {
    Enrolled(EnrollResponse),
    Pending(EnrollResponse),
    Refused(Refusal),
}

/// Who the machine will be.
struct Target {
    name: String,
    role: Role,
    /// The inventory's address; `None`: the address the machine enrolled from.
    ip: Option<std::net::Ipv4Addr>,
    proof: Proof,
    /// A name to generate from the identity (auto-worker).
    generated: bool,
}

impl Fleet {
    /// `POST /v1/enroll` on a connection whose channel binding is `binding`.
    pub async fn enroll(&self, req: EnrollRequest, source: IpAddr, binding: &str) -> Result<EnrollResponse, ApiError> {
        let subject = req.identity.key();
        let out = self.enroll_checked(req, source, binding).await;
        match out {
            Ok(Decision::Enrolled(r)) => {
                self.metrics.enrolled();
                Ok(r)
            }
            Ok(Decision::Pending(r)) => Ok(r),
            Ok(Decision::Refused(r)) | Err(r) => Err(self.refuse("enroll", source, &subject, r.error, &r.detail)),
        }
    }

    async fn enroll_checked(&self, req: EnrollRequest, source: IpAddr, binding: &str) -> Result<Decision, Refusal> {
        if req.protocol != PROTOCOL_VERSION {
            return Err(ApiError::new(
                ErrorCode::UnsupportedProtocol,
                format!("protocol {} is not supported (this server speaks {PROTOCOL_VERSION})", req.protocol),
            )
            .into());
        }
        let identity = req.identity.normalized().map_err(|e| {
            let code =
                if matches!(e, proto::wire::IdentityError::TooManyMacs(_) | proto::wire::IdentityError::Field { .. }) {
                    ErrorCode::TooLarge
                } else {
                    ErrorCode::BadRequest
                };
            ApiError::new(code, e.to_string())
        })?;
        let credential = req.token.as_ref().map(|t| self.credential(t)).transpose()?;
        let csr =
            Csr::verify(&req.csr, Some(binding)).map_err(|e| ApiError::new(ErrorCode::CsrRefused, e.to_string()))?;
        let key = records::key_fingerprint(csr.spki());
        let spki_hex = crate::digest::sha256_hex(csr.spki());
        // A node outside the inventory is known by the address it enrolled from: its kubelet
        // serving certificate and its pod routes are issued for that address.
        let source_ip = match source.to_canonical() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        };
        let source = source.to_string();
        let inventory = self.cluster.nodes.iter().find(|n| {
            n.uuid.as_ref().is_some_and(|u| identity.uuid.as_deref() == Some(u.as_str()))
                || n.mac.as_ref().is_some_and(|mac| identity.macs.iter().any(|x| x == mac.as_str()))
        });
        let (identity, credential, csr, key, spki_hex, source, image) =
            (&identity, &credential, &csr, &key, &spki_hex, &source, &req.image);
        self.transact(txn!(|tx| {
            let at = now();
            let mkey = identity.key();
            let machine: Option<MachineRecord> = tx.get(&records::machine_key(&mkey)).await?;

            // Bound already: the same key again is a retry; any other key is a conflict.
            if let Some(m) =
                machine.as_ref().filter(|m| matches!(m.state, MachineState::Enrolled | MachineState::Revoked))
            {
                let name = m.node.clone().unwrap_or_default();
                let Some(mut node) = tx.get::<NodeRecord>(&records::node_key(&name)).await? else {
                    return Err(ApiError::new(
                        ErrorCode::Internal,
                        format!("machine {mkey} is bound to a missing node"),
                    ));
                };
                if node.revoked.is_some() {
                    return Ok(Decision::Refused(refused(format!(
                        "node {name} was revoked; `imgbuild nodes reset {name}` lets a machine enroll as it again"
                    ))));
                }
                if node.client.spki == *spki_hex {
                    return Ok(Decision::Enrolled(enrolled(&node)));
                }
                node.conflict(Conflict { at, source: source.clone(), key: key.clone(), machine: mkey.clone() });
                tx.put(&records::node_key(&name), &node);
                tx.audit(
                    "conflict",
                    &[
                        ("node", &name),
                        ("bound", &format!("sha256:{}", node.client.spki)),
                        ("claimed-by", key),
                        ("source", source),
                    ],
                );
                return Ok(Decision::Refused(refused(format!(
                    "node {name} is bound to another key; {key} from {source} refused"
                ))));
            }

            let target = match self.target(identity, inventory, credential.as_ref(), machine.as_ref(), key) {
                Ok(Some(t)) => t,
                Ok(None) => {
                    return self.pending(tx, identity, inventory.map(|n| n.role), machine, key, source).await;
                }
                Err(r) => return Ok(Decision::Refused(r)),
            };
            let target = match target.generated {
                true => Target { name: generated_name(tx, &mkey).await?, ..target },
                false => target,
            };

            // One machine per node, for good.
            let node_key = records::node_key(&target.name);
            if let Some(mut other) = tx.get::<NodeRecord>(&node_key).await? {
                other.conflict(Conflict { at, source: source.clone(), key: key.clone(), machine: mkey.clone() });
                tx.put(&node_key, &other);
                tx.audit(
                    "conflict",
                    &[
                        ("node", &target.name),
                        ("bound", &other.machine),
                        ("claimed-by", &mkey),
                        ("key", key),
                        ("source", source),
                    ],
                );
                return Ok(Decision::Refused(refused(format!(
                    "node {} is bound to machine {}; {mkey} refused",
                    target.name, other.machine
                ))));
            }
            if let Some(t) = &credential {
                if let Some(exhausted) = spend(tx, t, &mkey).await? {
                    return Ok(Decision::Refused(Refusal { error: exhausted, detail: String::new() }));
                }
            }
            let spec = pki::enroll_client_spec(&target.name, target.role);
            let cert = self
                .cas
                .enrollment
                .sign(&spec, csr, self.cluster.pki.cert_validity)
                .map_err(|e| ApiError::new(ErrorCode::CsrRefused, e.to_string()))?;
            let node = NodeRecord {
                name: target.name.clone(),
                role: target.role,
                machine: mkey.clone(),
                ip: target.ip.or(source_ip),
                image: image.clone(),
                enrolled_at: at,
                proof: target.proof,
                token: credential.as_ref().map(|t| t.id().to_string()),
                source: source.clone(),
                client: StoredCert { spki: spki_hex.clone(), cert },
                certs: Default::default(),
                revoked: None,
                phase: Some(Phase::Enroll),
                status: Some(PhaseStatus::Succeeded),
                message: String::new(),
                last_report_at: None,
                reports: Vec::new(),
                errors: Vec::new(),
                conflicts: Vec::new(),
            };
            if let Some(m) = &machine {
                forget_pending(tx, m).await?;
            }
            let mut rec = machine.clone().unwrap_or_else(|| MachineRecord::new(identity, target.role, source, at));
            rec.state = MachineState::Enrolled;
            rec.role = target.role;
            rec.node = Some(target.name.clone());
            rec.last_seen = at;
            rec.source = source.clone();
            rec.pending.clear();
            rec.approved_key = None;
            tx.put(&node_key, &node);
            tx.put(&records::machine_key(&mkey), &rec);
            tx.audit(
                "enrolled",
                &[
                    ("node", &target.name),
                    ("role", target.role.as_str()),
                    ("machine", &mkey),
                    ("proof", target.proof.as_str()),
                    ("token", node.token.as_deref().unwrap_or("")),
                    ("key", key),
                    ("source", source),
                ],
            );
            Ok(Decision::Enrolled(enrolled(&node)))
        }))
        .await
        .map_err(Refusal::from)
    }

    /// The enrollment credential a machine presented, if it is one that is valid now.
    fn credential(&self, presented: &proto::BootstrapToken) -> Result<TokenRecord, ApiError> {
        let tokens = self.tokens()?;
        let Some(rec) =
            tokens.iter().find(|t| t.token.matches(presented) && t.usages.contains(&TokenUsage::Enrollment))
        else {
            return Err(ApiError::new(
                ErrorCode::InvalidToken,
                format!("token {presented} is not an enrollment credential of this server"),
            ));
        };
        match rec.state(now()) {
            TokenState::Valid => Ok(rec.clone()),
            TokenState::Revoked => {
                Err(ApiError::new(ErrorCode::TokenRevoked, format!("token {presented} was revoked")))
            }
            TokenState::Expired => {
                Err(ApiError::new(ErrorCode::TokenExpired, format!("token {presented} has expired")))
            }
        }
    }

    /// Which node the machine becomes with what it presented; `None`: it waits for approval.
    fn target(
        &self,
        identity: &MachineIdentity,
        inventory: Option<&crate::cluster::Node>,
        credential: Option<&TokenRecord>,
        machine: Option<&MachineRecord>,
        key: &str,
    ) -> Result<Option<Target>, Refusal> {
        let refuse = |detail: String| Err(refused(detail));
        let from_inventory = |n: &crate::cluster::Node, proof| Target {
            name: n.name.clone(),
            role: n.role,
            ip: Some(n.ip()),
            proof,
            generated: false,
        };
        // Approved: that key binds, as the operator decided (a credential cannot change the role).
        if let Some(m) = machine.filter(|m| m.state == MachineState::Approved) {
            if m.approved_key.as_deref() != Some(key) {
                return refuse(format!(
                    "machine {} was approved for key {}, not {key}",
                    m.key,
                    m.approved_key.as_deref().unwrap_or("-")
                ));
            }
            if credential.is_some_and(|c| c.role != Some(m.role)) {
                return refuse(format!(
                    "machine {} was approved as {}; its credential is for another role",
                    m.key, m.role
                ));
            }
            return Ok(Some(match inventory {
                Some(entry) => from_inventory(entry, Proof::Approved),
                None => Target {
                    name: m.node.clone().unwrap_or_default(),
                    role: m.role,
                    ip: None,
                    proof: Proof::Approved,
                    generated: false,
                },
            }));
        }
        match (credential, inventory) {
            // A node credential: exactly its own inventory entry.
            (Some(c), inv) if c.node.is_some() => match inv {
                Some(entry) if Some(&entry.name) == c.node.as_ref() => {
                    Ok(Some(from_inventory(entry, Proof::Credential)))
                }
                Some(n) => refuse(format!(
                    "the credential of node {} was presented by {} (inventory node {})",
                    c.node.as_deref().unwrap_or(""),
                    identity.key(),
                    n.name
                )),
                None => refuse(format!(
                    "the credential of node {} was presented by {}, which is not in the inventory",
                    c.node.as_deref().unwrap_or(""),
                    identity.key()
                )),
            },
            // The worker token: workers only.
            (Some(c), _) if c.role != Some(Role::Worker) => {
                refuse(format!("token {} is a role token for {:?}: role tokens enroll workers only", c.id(), c.role))
            }
            (Some(_), Some(entry)) if entry.role == Role::Worker => Ok(Some(from_inventory(entry, Proof::WorkerToken))),
            (Some(c), Some(n)) => refuse(format!(
                "the worker token {} was presented by {}, inventory {} {}",
                c.id(),
                identity.key(),
                n.role,
                n.name
            )),
            (Some(_), None) => match self.cluster.enrollment.policy {
                EnrollPolicy::AutoWorker => Ok(Some(Target {
                    name: String::new(),
                    role: Role::Worker,
                    ip: None,
                    proof: Proof::WorkerToken,
                    generated: true,
                })),
                EnrollPolicy::Approve => Ok(None),
                EnrollPolicy::KnownOnly => {
                    refuse(format!("{} is not in the inventory and the policy is known-only", identity.key()))
                }
            },
            // Nothing: the operator decides.
            (None, Some(_)) => Ok(None),
            (None, None) => match self.cluster.enrollment.policy {
                EnrollPolicy::KnownOnly => {
                    refuse(format!("{} is not in the inventory and the policy is known-only", identity.key()))
                }
                EnrollPolicy::Approve | EnrollPolicy::AutoWorker => Ok(None),
            },
        }
    }

    /// Queues the machine's key for approval (bounded per source and in all).
    async fn pending(
        &self,
        tx: &mut Tx<'_>,
        identity: &MachineIdentity,
        inventory_role: Option<Role>,
        machine: Option<MachineRecord>,
        key: &str,
        source: &str,
    ) -> Result<Decision, ApiError> {
        let at = now();
        let mkey = identity.key();
        let mut rec =
            machine.unwrap_or_else(|| MachineRecord::new(identity, inventory_role.unwrap_or(Role::Worker), source, at));
        let new_machine = rec.pending.is_empty();
        if !rec.pending.iter().any(|p| p.key == key) {
            if rec.pending.len() >= records::KEEP_PENDING_KEYS {
                return Err(ApiError::new(
                    ErrorCode::RateLimited,
                    "this machine has asked with too many keys; the operator must decide",
                ));
            }
            if new_machine {
                let from_source = self.store.list(&records::pending_prefix(source)).await?.len();
                if from_source >= PENDING_PER_SOURCE {
                    return Err(ApiError::new(
                        ErrorCode::RateLimited,
                        format!("{from_source} machines from {source} wait for approval already"),
                    ));
                }
                let count: u64 = tx.get(records::PENDING_COUNT).await?.unwrap_or(0);
                if count >= PENDING_TOTAL {
                    return Err(ApiError::new(ErrorCode::RateLimited, "too many machines wait for approval"));
                }
                tx.put(records::PENDING_COUNT, &(count + 1));
                tx.put(&format!("{}{mkey}", records::pending_prefix(source)), &true);
                tx.audit("pending", &[("machine", &mkey), ("key", key), ("source", source)]);
            } else {
                tx.audit("pending-key", &[("machine", &mkey), ("key", key), ("source", source)]);
            }
            rec.pending.push(PendingKey { key: key.to_string(), source: source.to_string(), at });
            rec.last_seen = at;
            tx.put(&records::machine_key(&mkey), &rec);
        }
        Ok(Decision::Pending(EnrollResponse {
            status: EnrollStatus::Pending,
            node: None,
            client_cert: None,
            retry_after_secs: Some(30),
            message: format!("machine {mkey} waits for the operator: `imgbuild nodes approve {mkey} --key {key}`"),
        }))
    }
}

/// A stable name for a machine outside the inventory, derived from its identity: the shortest
/// that no other machine's node has (a collision of 8 hex digits takes a longer one).
async fn generated_name(tx: &mut Tx<'_>, mkey: &str) -> Result<String, ApiError> {
    let h = crate::digest::sha256_hex(mkey.as_bytes());
    for len in (8..=64).step_by(4) {
        let name = format!("{}-{}", Role::Worker, &h[..len]);
        match tx.get::<NodeRecord>(&records::node_key(&name)).await? {
            Some(n) if n.machine != mkey => continue,
            _ => return Ok(name),
        }
    }
    Err(ApiError::new(ErrorCode::Internal, format!("no free node name for {mkey}")))
}

/// Counts a limited credential's use by this machine (a machine asking again spends nothing):
/// a marker per machine and a count. Credentials without a limit keep neither (a count every
/// enrollment updates would serialize them). `Some`: the credential is spent.
async fn spend(tx: &mut Tx<'_>, t: &TokenRecord, mkey: &str) -> Result<Option<ApiError>, ApiError> {
    let Some(max) = t.max_uses else { return Ok(None) };
    let marker = records::token_use_marker(t.id(), mkey);
    if tx.get::<bool>(&marker).await?.is_some() {
        return Ok(None);
    }
    let uses_key = records::token_uses_key(t.id());
    let used: u32 = tx.get(&uses_key).await?.unwrap_or(0);
    if used >= max {
        return Ok(Some(ApiError::new(
            ErrorCode::TokenExhausted,
            format!("token {} has been used by {used} machines, its limit", t.id()),
        )));
    }
    tx.put(&uses_key, &(used + 1));
    tx.put(&marker, &true);
    Ok(None)
}

/// Drops a machine's place in the approval queue, if it holds one: a stored record that waits
/// with at least one key (counted when its first key was queued). Anything else touches nothing,
/// least of all the queue's count, a key every queued enrollment shares: reading it in every
/// enrollment made concurrent enrollments conflict and retry (measured: 6.2 ms of server CPU per
/// enrollment instead of 1.7 ms).
pub(super) async fn forget_pending(tx: &mut Tx<'_>, rec: &MachineRecord) -> Result<(), ApiError> {
    if rec.state != MachineState::Pending || rec.pending.is_empty() {
        return Ok(());
    }
    for source in rec.pending.iter().map(|p| p.source.as_str()).chain([rec.source.as_str()]) {
        tx.delete(&format!("{}{}", records::pending_prefix(source), rec.key));
    }
    let count: u64 = tx.get(records::PENDING_COUNT).await?.unwrap_or(0);
    tx.put(records::PENDING_COUNT, &count.saturating_sub(1));
    Ok(())
}

fn enrolled(node: &NodeRecord) -> EnrollResponse {
    EnrollResponse {
        status: EnrollStatus::Enrolled,
        node: Some(NodeAssignment { name: node.name.clone(), role: node.role }),
        client_cert: Some(node.client.cert.clone()),
        retry_after_secs: None,
        message: format!("enrolled as {} node {}", node.role, node.name),
    }
}
