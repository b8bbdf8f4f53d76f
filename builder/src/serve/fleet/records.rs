//! What the enrollment server keeps, one JSON record per key:
//!
//! | key | record |
//! |---|---|
//! | `machines/<identity key>` | [`MachineRecord`]: a machine, pending, approved or bound |
//! | `nodes/<name>` | [`NodeRecord`]: binding, proof, certificates, reports, conflicts |
//! | `token-uses/<id>`, `token-uses/<id>/<identity key>` | how many and which machines spent a limited credential |
//! | `pod-slots/<index>` | which machine outside the inventory holds which per-node pod range |
//! | `pending/<source>/<identity key>`, `pending-count` | machines waiting for approval, per source and in all |
//! | `lease/bootstrap` | [`LeaseRecord`]: which master applies the cluster objects |
//! | `audit/<time>-<nonce>-<n>` | one audit line per change, written with the change |

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proto::Role;
use proto::wire::{
    CertPurpose, Conflict, ImageInfo, MachineIdentity, MachineState, NodeStatus, Phase, PhaseStatus, Proof, Report,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::pki::NodeIdentity;

/// Reports, errors and conflicts kept per node (older ones are in the audit log).
pub const KEEP_REPORTS: usize = 64;
/// Failure messages kept per node.
pub const KEEP_ERRORS: usize = 16;
/// Conflicts kept per node.
pub const KEEP_CONFLICTS: usize = 16;
/// Keys a pending machine may have asked with (more is someone else using its MAC).
pub const KEEP_PENDING_KEYS: usize = 4;

/// The key of a [`MachineRecord`] (`machines/<identity key>`).
pub fn machine_key(identity_key: &str) -> String {
    format!("machines/{identity_key}")
}

/// The key of a [`NodeRecord`] (`nodes/<name>`).
pub fn node_key(name: &str) -> String {
    format!("nodes/{name}")
}

/// The key of a limited credential's use count.
pub fn token_uses_key(token_id: &str) -> String {
    format!("token-uses/{token_id}")
}

/// The key marking that a machine has spent a use of a limited credential.
pub fn token_use_marker(token_id: &str, identity_key: &str) -> String {
    format!("token-uses/{token_id}/{identity_key}")
}

/// The prefix of the keys of machines waiting for approval from `source`.
pub fn pending_prefix(source: &str) -> String {
    format!("pending/{source}/")
}

/// The key of the number of machines waiting for approval, from every source.
pub const PENDING_COUNT: &str = "pending-count";
/// The key of the [`LeaseRecord`].
pub const LEASE: &str = "lease/bootstrap";

/// Unique and in time order across replicas: nanoseconds, a random nonce, the event's index.
pub fn audit_key(at: OffsetDateTime, n: usize) -> String {
    let mut nonce = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce);
    format!("audit/{:020}-{}-{n}", at.unix_timestamp_nanos(), crate::digest::hex(&nonce))
}

/// `sha256:<hex>` of a DER SubjectPublicKeyInfo: how keys are shown to operators and compared.
pub fn key_fingerprint(spki_der: &[u8]) -> String {
    format!("sha256:{}", crate::digest::sha256_hex(spki_der))
}

/// A key that asked to enroll a machine without a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingKey {
    /// `sha256:` of the key's SubjectPublicKeyInfo.
    pub key: String,
    /// The address it asked from.
    pub source: String,
    /// When it last asked.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A machine the server has seen: pending, approved, enrolled or revoked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineRecord {
    /// Its identity key ([`MachineIdentity::key`]), the record's key in the store.
    pub key: String,
    /// The identity it gave.
    pub identity: MachineIdentity,
    /// Where it is in enrollment.
    pub state: MachineState,
    /// The role it would be (or was) given.
    pub role: Role,
    /// The node it is bound to.
    pub node: Option<String>,
    /// When it first asked to enroll.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// When it last asked to enroll.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// The address it last asked from.
    pub source: String,
    /// Pending: the keys that asked (the first is shown as the machine's).
    #[serde(default)]
    pub pending: Vec<PendingKey>,
    /// Approved: the one key that may bind.
    #[serde(default)]
    pub approved_key: Option<String>,
}

impl MachineRecord {
    /// A machine seen for the first time now.
    pub fn new(identity: &MachineIdentity, role: Role, source: &str, at: OffsetDateTime) -> Self {
        MachineRecord {
            key: identity.key(),
            identity: identity.clone(),
            state: MachineState::Pending,
            role,
            node: None,
            first_seen: at,
            last_seen: at,
            source: source.to_string(),
            pending: Vec::new(),
            approved_key: None,
        }
    }
}

/// A certificate the server issued, with the key it certifies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredCert {
    /// hex SHA-256 of the certified SubjectPublicKeyInfo.
    pub spki: String,
    /// The certificate, PEM.
    pub cert: String,
}

/// A node bound to a machine: how it was proven, its certificates and its reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// The node's name.
    pub name: String,
    /// The node's role.
    pub role: Role,
    /// The identity key of the machine bound to it.
    pub machine: String,
    /// The node's address: the inventory's, or else the one the machine enrolled from.
    pub ip: Option<Ipv4Addr>,
    /// The image the machine said it booted.
    pub image: Option<ImageInfo>,
    /// When the machine was bound.
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    /// What proved the machine to be this node.
    pub proof: Proof,
    /// The credential it enrolled with (token id), if any.
    #[serde(default)]
    pub token: Option<String>,
    /// The address the machine enrolled from.
    pub source: String,
    /// The enrollment client certificate the node authenticates with.
    pub client: StoredCert,
    /// The newest certificate issued for each purpose.
    #[serde(default)]
    pub certs: BTreeMap<CertPurpose, StoredCert>,
    /// When the operator revoked the node: its certificate is refused from then on.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked: Option<OffsetDateTime>,
    /// The phase of the last report.
    pub phase: Option<Phase>,
    /// The status of the last report.
    pub status: Option<PhaseStatus>,
    /// The message of the last report.
    #[serde(default)]
    pub message: String,
    /// When the node last reported.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_report_at: Option<OffsetDateTime>,
    /// The newest [`KEEP_REPORTS`] reports, oldest first.
    #[serde(default)]
    pub reports: Vec<Report>,
    /// The newest [`KEEP_ERRORS`] failures (`phase: message`), oldest first.
    #[serde(default)]
    pub errors: Vec<String>,
    /// The newest [`KEEP_CONFLICTS`] attempts by another key or machine to enroll as this node.
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
}

impl NodeRecord {
    /// What its certificates are issued for: name, role and address.
    pub fn identity(&self) -> NodeIdentity {
        NodeIdentity { name: self.name.clone(), role: self.role, ip: self.ip }
    }

    /// Keeps the newest [`KEEP_CONFLICTS`] attempts to take this node.
    pub fn conflict(&mut self, c: Conflict) {
        self.conflicts.push(c);
        let excess = self.conflicts.len().saturating_sub(KEEP_CONFLICTS);
        self.conflicts.drain(..excess);
    }
}

/// The bootstrap lease: which master applies the cluster objects, and whether one has.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// The master that took the lease last.
    pub holder: Option<String>,
    /// When the holder's lease runs out and another master may take it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires: Option<OffsetDateTime>,
    /// The objects are applied: nobody takes the lease any more.
    pub completed: bool,
}

/// One row of `imgbuild nodes`: a machine and, once bound, its node.
pub fn status(m: &MachineRecord, node: Option<&NodeRecord>) -> NodeStatus {
    let key = match (node, m.state) {
        (Some(n), _) => Some(format!("sha256:{}", n.client.spki)),
        (None, MachineState::Approved) => m.approved_key.clone(),
        (None, _) => m.pending.first().map(|p| p.key.clone()),
    };
    NodeStatus {
        machine: m.key.clone(),
        node: m.node.clone(),
        role: node.map_or(m.role, |n| n.role),
        state: m.state,
        proof: node.map(|n| n.proof),
        other_keys: m.pending.iter().skip(1).map(|p| p.key.clone()).collect(),
        key,
        source: node.map_or_else(|| m.source.clone(), |n| n.source.clone()),
        token: node.and_then(|n| n.token.clone()),
        phase: node.and_then(|n| n.phase),
        status: node.and_then(|n| n.status),
        message: node.map(|n| n.message.clone()).unwrap_or_default(),
        last_report_at: node.and_then(|n| n.last_report_at),
        enrolled_at: node.map(|n| n.enrolled_at),
        errors: node.map(|n| n.errors.clone()).unwrap_or_default(),
        conflicts: node.map(|n| n.conflicts.clone()).unwrap_or_default(),
        certificates: node.map_or(0, |n| n.certs.len()),
    }
}
