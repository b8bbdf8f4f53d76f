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
pub const KEEP_ERRORS: usize = 16;
pub const KEEP_CONFLICTS: usize = 16;
/// Keys a pending machine may have asked with (more is someone else using its MAC).
pub const KEEP_PENDING_KEYS: usize = 4;

pub fn machine_key(identity_key: &str) -> String {
    format!("machines/{identity_key}")
}

pub fn node_key(name: &str) -> String {
    format!("nodes/{name}")
}

pub fn pod_slot_key(slot: usize) -> String {
    format!("pod-slots/{slot}")
}

pub fn token_uses_key(token_id: &str) -> String {
    format!("token-uses/{token_id}")
}

pub fn token_use_marker(token_id: &str, identity_key: &str) -> String {
    format!("token-uses/{token_id}/{identity_key}")
}

pub fn pending_prefix(source: &str) -> String {
    format!("pending/{source}/")
}

pub const PENDING_COUNT: &str = "pending-count";
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
    pub key: String,
    pub source: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineRecord {
    pub key: String,
    pub identity: MachineIdentity,
    pub state: MachineState,
    pub role: Role,
    pub node: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredCert {
    /// hex SHA-256 of the certified SubjectPublicKeyInfo.
    pub spki: String,
    pub cert: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    pub role: Role,
    pub machine: String,
    pub ip: Option<Ipv4Addr>,
    /// Index of the node's pod range in the pod CIDR.
    pub pod_index: usize,
    pub image: Option<ImageInfo>,
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    pub proof: Proof,
    /// The credential it enrolled with (token id), if any.
    #[serde(default)]
    pub token: Option<String>,
    pub source: String,
    pub client: StoredCert,
    #[serde(default)]
    pub certs: BTreeMap<CertPurpose, StoredCert>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked: Option<OffsetDateTime>,
    pub phase: Option<Phase>,
    pub status: Option<PhaseStatus>,
    #[serde(default)]
    pub message: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_report_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub reports: Vec<Report>,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
}

impl NodeRecord {
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    pub holder: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires: Option<OffsetDateTime>,
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
