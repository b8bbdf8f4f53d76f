//! The enrollment protocol between `imgbuild serve` and `firstboot`: versioned JSON over HTTPS.
//!
//! 1. `POST /v1/enroll` with the machine's identity, a CSR for a key the node made, and its
//!    credential if it has one (a one-time credential for its inventory entry, or the worker
//!    token): the server binds the machine to a node and returns a client certificate, or queues
//!    it for the operator's approval. The CSR carries the connection's TLS exporter value
//!    ([`CHANNEL_BINDING_LABEL`], RFC 9266) in its challengePassword attribute, so it proves
//!    possession of the key on this connection and is worthless on any other.
//! 2. `GET /v1/config`: the node's role config (files with modes, units, host settings, which
//!    certificates to request, how to join).
//! 3. `POST /v1/sign` with CSRs for the keys the node generated: certificates whose subject, SANs,
//!    usages and validity the server decides.
//! 4. `POST /v1/report` after every phase; `POST /v1/bootstrap-lease` lets one master apply the
//!    cluster objects.
//!
//! The operator's calls (`/v1/nodes/...`) need the admin identity of the state dir. Errors are
//! an HTTP status with an [`ErrorBody`]. Every type here is used by both sides; change them
//! together with [`PROTOCOL_VERSION`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bootcfg::StaticNetwork;
use crate::pin::CaPin;
use crate::role::Role;
use crate::token::BootstrapToken;

/// 2: the credential is optional (approval), the CSR is bound to the connection.
pub const PROTOCOL_VERSION: u32 = 2;
pub const PATH_ENROLL: &str = "/v1/enroll";
pub const PATH_CONFIG: &str = "/v1/config";
pub const PATH_SIGN: &str = "/v1/sign";
pub const PATH_REPORT: &str = "/v1/report";
pub const PATH_BOOTSTRAP_LEASE: &str = "/v1/bootstrap-lease";
pub const PATH_HEALTH: &str = "/healthz";
pub const PATH_METRICS: &str = "/metrics";
/// The operator's calls.
pub const PATH_NODES: &str = "/v1/nodes";
pub const PATH_NODES_APPROVE: &str = "/v1/nodes/approve";
pub const PATH_NODES_RESET: &str = "/v1/nodes/reset";
pub const PATH_NODES_REVOKE: &str = "/v1/nodes/revoke";
/// Open (no credential): what a machine needs to find and pin the server, never a secret.
pub const PATH_PAYLOAD_ROLE: &str = "/v1/payload/role/{role}";
pub const PATH_PAYLOAD_NODE: &str = "/v1/payload/node/{name}";

/// The open payload URL of a role (`/v1/payload/role/worker`).
pub fn payload_role_path(role: Role) -> String {
    PATH_PAYLOAD_ROLE.replace("{role}", role.as_str())
}

/// The open payload URL of an inventory node.
pub fn payload_node_path(name: &str) -> String {
    PATH_PAYLOAD_NODE.replace("{name}", name)
}

/// RFC 9266 tls-exporter channel binding: the exporter label, and its length in bytes (empty
/// context). Its base64 goes into the enrollment CSR's challengePassword attribute, as EST
/// (RFC 7030 section 3.5) puts tls-unique there.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
pub const CHANNEL_BINDING_LEN: usize = 32;

/// The challengePassword text of a channel binding value.
pub fn channel_binding_text(exporter: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(exporter)
}

/// Limits both sides keep: a server refuses more; a client never sends more.
pub mod limits {
    /// MAC addresses in one identity.
    pub const MACS: usize = 16;
    /// Characters of an SMBIOS UUID or serial number.
    pub const IDENTITY_FIELD: usize = 64;
    /// Bytes of a report's message.
    pub const REPORT_MESSAGE: usize = 4096;
    /// Bytes of a request body.
    pub const BODY: usize = 64 * 1024;
}

/// Who a machine is, as firstboot found out from DMI, NICs and the kernel command line. What a
/// machine says about itself: it selects an inventory entry, it proves nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MachineIdentity {
    /// SMBIOS system UUID (lowercase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// SMBIOS system serial number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// MAC addresses of the physical NICs (lowercase, colon-separated, sorted).
    #[serde(default)]
    pub macs: Vec<String>,
}

/// Why an identity is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the identity has neither an SMBIOS UUID nor a MAC address")]
    Empty,
    #[error("the identity has {0} MAC addresses (at most {max})", max = limits::MACS)]
    TooManyMacs(usize),
    #[error("'{0}' is not a MAC address (six hex pairs separated by ':' or '-')")]
    Mac(String),
    #[error("the SMBIOS {field} is over {max} characters or not printable", max = limits::IDENTITY_FIELD)]
    Field { field: &'static str },
}

/// A MAC in the one form identities and inventories use: lowercase, colon-separated.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let m = mac.trim().to_ascii_lowercase().replace('-', ":");
    let ok = m.len() == 17
        && m.split(':').count() == 6
        && m.split(':').all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(m)
}

impl MachineIdentity {
    /// The key a machine is bound by: its SMBIOS UUID, or its sorted MACs when it has none.
    pub fn key(&self) -> String {
        match &self.uuid {
            Some(u) => format!("uuid:{u}"),
            None => format!("macs:{}", self.macs.join(",")),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.uuid.is_none() && self.macs.is_empty()
    }

    /// The one form both sides compare: UUID lowercased, MACs lowercased with ':', sorted and
    /// de-duplicated, empty fields dropped; and within [`limits`].
    pub fn normalized(&self) -> Result<MachineIdentity, IdentityError> {
        let field = |v: &Option<String>, name: &'static str, lower: bool| -> Result<Option<String>, IdentityError> {
            let Some(v) = v.as_deref().map(str::trim).filter(|v| !v.is_empty()) else { return Ok(None) };
            if v.chars().count() > limits::IDENTITY_FIELD || v.chars().any(|c| c.is_control()) {
                return Err(IdentityError::Field { field: name });
            }
            Ok(Some(if lower { v.to_ascii_lowercase() } else { v.to_string() }))
        };
        if self.macs.len() > limits::MACS {
            return Err(IdentityError::TooManyMacs(self.macs.len()));
        }
        let mut macs = Vec::with_capacity(self.macs.len());
        for m in self.macs.iter().filter(|m| !m.trim().is_empty()) {
            macs.push(normalize_mac(m).ok_or_else(|| IdentityError::Mac(m.chars().take(40).collect()))?);
        }
        macs.sort();
        macs.dedup();
        let id = MachineIdentity {
            uuid: field(&self.uuid, "UUID", true)?,
            serial: field(&self.serial, "serial", false)?,
            macs,
        };
        if id.is_empty() {
            return Err(IdentityError::Empty);
        }
        Ok(id)
    }
}

/// Baked into every image at [`crate::paths::IMAGE_INFO`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageInfo {
    /// The image definition's name (e.g. `debian-12`).
    pub name: String,
    pub role: Role,
    /// The Kubernetes version of the binaries in the image (`v1.20.2`).
    pub kubernetes_version: String,
    /// Component name → version, for every pinned component in the image.
    #[serde(default)]
    pub components: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnrollRequest {
    pub protocol: u32,
    /// The machine's credential: its own one-time credential, or the worker token. Without one
    /// the machine waits for the operator's approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<BootstrapToken>,
    pub identity: MachineIdentity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    /// PEM CSR for the node's enrollment key, bound to this connection (see the module docs);
    /// the server returns a client certificate for it.
    pub csr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnrollStatus {
    /// Bound to a node; `node` and `client_cert` are set.
    Enrolled,
    /// Waits for `imgbuild nodes approve`; ask again later, with the same key.
    Pending,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeAssignment {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnrollResponse {
    pub status: EnrollStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeAssignment>,
    /// PEM client certificate for the enrollment key (signed by the enrollment CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u32>,
    pub message: String,
}

/// What a certificate is for. The server derives subject, SANs, key usages, EKUs and validity
/// from the purpose and the inventory; nothing of that is taken from the CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertPurpose {
    Apiserver,
    ApiserverKubeletClient,
    ApiserverEtcdClient,
    FrontProxyClient,
    EtcdServer,
    EtcdPeer,
    EtcdHealthcheckClient,
    ControllerManager,
    Scheduler,
    Admin,
    KubeletServing,
    KubeProxy,
}

impl CertPurpose {
    pub const ALL: [CertPurpose; 12] = [
        CertPurpose::Apiserver,
        CertPurpose::ApiserverKubeletClient,
        CertPurpose::ApiserverEtcdClient,
        CertPurpose::FrontProxyClient,
        CertPurpose::EtcdServer,
        CertPurpose::EtcdPeer,
        CertPurpose::EtcdHealthcheckClient,
        CertPurpose::ControllerManager,
        CertPurpose::Scheduler,
        CertPurpose::Admin,
        CertPurpose::KubeletServing,
        CertPurpose::KubeProxy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CertPurpose::Apiserver => "apiserver",
            CertPurpose::ApiserverKubeletClient => "apiserver-kubelet-client",
            CertPurpose::ApiserverEtcdClient => "apiserver-etcd-client",
            CertPurpose::FrontProxyClient => "front-proxy-client",
            CertPurpose::EtcdServer => "etcd-server",
            CertPurpose::EtcdPeer => "etcd-peer",
            CertPurpose::EtcdHealthcheckClient => "etcd-healthcheck-client",
            CertPurpose::ControllerManager => "controller-manager",
            CertPurpose::Scheduler => "scheduler",
            CertPurpose::Admin => "admin",
            CertPurpose::KubeletServing => "kubelet-serving",
            CertPurpose::KubeProxy => "kube-proxy",
        }
    }
}

impl std::fmt::Display for CertPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CsrRequest {
    pub purpose: CertPurpose,
    /// PEM PKCS#10 request.
    pub csr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignRequest {
    pub csrs: Vec<CsrRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IssuedCert {
    pub purpose: CertPurpose,
    /// PEM certificate.
    pub cert: String,
    /// PEM of the CA that issued it.
    pub ca: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignResponse {
    pub certs: Vec<IssuedCert>,
}

/// In a [`FileSpec`] with `expand`, stands for the name of the node's network interface.
pub const INTERFACE_PLACEHOLDER: &str = "@@INTERFACE@@";

/// A file the node writes, atomically, with this mode and owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileSpec {
    pub path: String,
    /// Permission bits (e.g. 0o644). Secrets are 0o600.
    pub mode: u32,
    /// `user` or `user:group`; root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// File contents, UTF-8.
    pub contents: String,
    /// Replace [`INTERFACE_PLACEHOLDER`] with the name of the node's network interface (which
    /// only the node knows) before writing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expand: bool,
}

/// A key the node generates and a certificate it requests for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertSpec {
    pub purpose: CertPurpose,
    pub key_path: String,
    pub cert_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UnitSpec {
    pub name: String,
    pub enable: bool,
    pub start: bool,
    /// Restart instead of start: the unit may already run with the image's configuration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostSetup {
    pub hostname: String,
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub swap_off: bool,
    #[serde(default)]
    pub data_disks: Vec<DataDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<StaticNetwork>,
    /// The node's NIC: its MAC from the inventory, else the address it must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_address: Option<String>,
}

/// A filesystem found by its label and mounted at `mount_point`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataDisk {
    pub label: String,
    pub mount_point: String,
    pub fstype: String,
    #[serde(default)]
    pub required: bool,
}

/// How the node joins Kubernetes once its services run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JoinSpec {
    /// The API through the VIP, `https://VIP:port`.
    pub api_server: String,
    pub node_name: String,
    /// The Kubernetes bootstrap token for kubelet TLS bootstrap.
    pub token: BootstrapToken,
    /// Pin of the cluster CA: discovery refuses a `cluster-info` whose CA does not match.
    pub ca_pin: CaPin,
    /// Fetch and verify `cluster-info` through the VIP before writing the bootstrap kubeconfig.
    pub discovery: bool,
    /// The kubelet unit to start once the bootstrap kubeconfig is in place.
    pub kubelet_unit: String,
    /// The bootstrap kubeconfig (API through the VIP, the cluster CA file, the token), written to
    /// [`crate::paths::BOOTSTRAP_KUBECONFIG`] once discovery has verified the cluster.
    pub bootstrap_kubeconfig: String,
    /// Masters: labels and taints to put on the node once it is registered.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_taints: Vec<Taint>,
    /// Masters: wait for the local control plane before joining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlPlaneCheck {
    /// etcd client URL to check `/health` on, with a client cert.
    pub etcd_url: String,
    pub etcd_ca: String,
    pub etcd_cert: String,
    pub etcd_key: String,
    /// The local apiserver (`https://<node ip>:6443`), checked at `/readyz`.
    pub apiserver_url: String,
    pub ca: String,
    /// Admin credentials, used for `/readyz` and to apply the cluster objects.
    pub admin_cert: String,
    pub admin_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Taint {
    pub key: String,
    #[serde(default)]
    pub value: String,
    pub effect: String,
}

/// Everything a node needs, rendered by the server for that node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    pub node: NodeAssignment,
    pub kubernetes_version: String,
    pub host: HostSetup,
    pub files: Vec<FileSpec>,
    pub certs: Vec<CertSpec>,
    pub units: Vec<UnitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinSpec>,
}

/// The first-boot phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Identify,
    Enroll,
    Fetch,
    WriteFiles,
    HostSetup,
    StartServices,
    Join,
    /// The final phase: the node reports its outcome ("joined", "control plane ready").
    Done,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Identify,
        Phase::Enroll,
        Phase::Fetch,
        Phase::WriteFiles,
        Phase::HostSetup,
        Phase::StartServices,
        Phase::Join,
        Phase::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Identify => "identify",
            Phase::Enroll => "enroll",
            Phase::Fetch => "fetch",
            Phase::WriteFiles => "write-files",
            Phase::HostSetup => "host-setup",
            Phase::StartServices => "start-services",
            Phase::Join => "join",
            Phase::Done => "done",
        }
    }

    pub fn next(self) -> Option<Phase> {
        let i = Phase::ALL.iter().position(|p| *p == self)?;
        Phase::ALL.get(i + 1).copied()
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseStatus {
    Started,
    Succeeded,
    Failed,
    Retrying,
}

impl PhaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseStatus::Started => "started",
            PhaseStatus::Succeeded => "succeeded",
            PhaseStatus::Failed => "failed",
            PhaseStatus::Retrying => "retrying",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Report {
    pub phase: Phase,
    pub status: PhaseStatus,
    /// At most [`limits::REPORT_MESSAGE`] bytes.
    pub message: String,
    /// A failure's stable code (firstboot's `PhaseError::code`), for counting and matching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `/proc/sys/kernel/random/boot_id`: tells reports of different boots apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaseRequest {
    /// `acquire` to take (or renew) the bootstrap lease, `release` once the objects are applied.
    pub action: LeaseAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseAction {
    Acquire,
    Complete,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaseResponse {
    /// This node holds the lease and must apply `objects`.
    pub granted: bool,
    /// The objects were already applied by some master: nothing to do.
    pub completed: bool,
    pub holder: Option<String>,
    /// Kubernetes objects (JSON) to create or update, in order.
    #[serde(default)]
    pub objects: Vec<serde_json::Value>,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    BadRequest,
    UnsupportedProtocol,
    InvalidToken,
    TokenExpired,
    TokenRevoked,
    TokenExhausted,
    /// This machine may not enroll this way. Deliberately unspecific (the inventory is not for
    /// whoever asks); the operator sees the reason in `imgbuild nodes` and the audit log.
    Refused,
    NotEnrolled,
    /// The node's enrollment was revoked by the operator.
    Revoked,
    CsrRefused,
    /// The request or a field of it is over a [`limits`] value.
    TooLarge,
    RateLimited,
    Internal,
}

impl ErrorCode {
    /// Errors worth retrying: the server may answer differently later.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::RateLimited | ErrorCode::Internal)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnsupportedProtocol => "unsupported-protocol",
            ErrorCode::InvalidToken => "invalid-token",
            ErrorCode::TokenExpired => "token-expired",
            ErrorCode::TokenRevoked => "token-revoked",
            ErrorCode::TokenExhausted => "token-exhausted",
            ErrorCode::Refused => "refused",
            ErrorCode::NotEnrolled => "not-enrolled",
            ErrorCode::Revoked => "revoked",
            ErrorCode::CsrRefused => "csr-refused",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub error: String,
}

// --- the operator's calls ----------------------------------------------------------------------

/// Where a machine is in the server's eyes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    /// Asked to enroll without a credential: waits for `imgbuild nodes approve`.
    Pending,
    /// Approved for one key: binds when it asks again with that key.
    Approved,
    Enrolled,
    /// Its enrollment was revoked: its certificate is refused until `imgbuild nodes reset`.
    Revoked,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Pending => "pending",
            MachineState::Approved => "approved",
            MachineState::Enrolled => "enrolled",
            MachineState::Revoked => "revoked",
        }
    }
}

/// What proved a machine to be the node it was bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proof {
    /// The node's own one-time credential, delivered out of band in its payload.
    Credential,
    /// The operator approved this machine's key.
    Approved,
    /// The worker token (shared by workers): a worker only, never CA material.
    WorkerToken,
}

impl Proof {
    pub fn as_str(self) -> &'static str {
        match self {
            Proof::Credential => "credential",
            Proof::Approved => "approved",
            Proof::WorkerToken => "worker-token",
        }
    }
}

/// An attempt to enroll as a node that is bound to another key (or machine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conflict {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub source: String,
    /// `sha256:` of the key that tried.
    pub key: String,
    pub machine: String,
}

/// One row of `imgbuild nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub machine: String,
    pub node: Option<String>,
    pub role: Role,
    pub state: MachineState,
    /// How the binding was proven (enrolled machines).
    #[serde(default)]
    pub proof: Option<Proof>,
    /// `sha256:` of the enrollment key: bound, or waiting for approval.
    #[serde(default)]
    pub key: Option<String>,
    /// Keys that asked for approval but are not the one shown in `key` (a spoofed MAC shows up here).
    #[serde(default)]
    pub other_keys: Vec<String>,
    /// Where the machine's requests come from.
    pub source: String,
    /// The credential it enrolled with (token id).
    #[serde(default)]
    pub token: Option<String>,
    pub phase: Option<Phase>,
    pub status: Option<PhaseStatus>,
    pub message: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_report_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub enrolled_at: Option<OffsetDateTime>,
    pub errors: Vec<String>,
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
    pub certificates: usize,
}

/// `POST /v1/nodes/approve`: a pending machine (identity key, MAC or UUID), optionally one key of
/// it, becomes a node (the inventory's, or `name` with `role`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApproveRequest {
    pub machine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// `POST /v1/nodes/reset`: unbind a node, so that a machine may enroll as it again (with a new
/// credential or the operator's approval).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResetRequest {
    pub node: String,
}

/// `POST /v1/nodes/revoke`: refuse a node's certificate from its next request on; by node, or
/// every node that enrolled with a credential (token id).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevokeResponse {
    pub revoked: Vec<String>,
}
