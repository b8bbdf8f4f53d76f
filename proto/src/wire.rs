//! The enrollment protocol between `imgbuild serve` and `firstboot`: versioned JSON over HTTPS.
//!
//! 1. `POST /v1/enroll` with the role's token, the machine's identity and a CSR for a key the node
//!    made: the server binds the machine to a node and returns a client certificate. The token is
//!    spent; everything after authenticates with that certificate.
//! 2. `GET /v1/config`: the node's role config (files with modes, units, host settings, which
//!    certificates to request, how to join).
//! 3. `POST /v1/sign` with CSRs for the keys the node generated: certificates whose subject, SANs,
//!    usages and validity the server decides.
//! 4. `POST /v1/report` after every phase; `POST /v1/bootstrap-lease` lets one master apply the
//!    cluster objects.
//!
//! Errors are an HTTP status with an [`ErrorBody`]. Every type here is used by both sides; change
//! them together with [`PROTOCOL_VERSION`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bootcfg::StaticNetwork;
use crate::pin::CaPin;
use crate::role::Role;
use crate::token::BootstrapToken;

pub const PROTOCOL_VERSION: u32 = 1;
pub const PATH_ENROLL: &str = "/v1/enroll";
pub const PATH_CONFIG: &str = "/v1/config";
pub const PATH_SIGN: &str = "/v1/sign";
pub const PATH_REPORT: &str = "/v1/report";
pub const PATH_BOOTSTRAP_LEASE: &str = "/v1/bootstrap-lease";
pub const PATH_HEALTH: &str = "/healthz";

/// Who a machine is, as firstboot found out from DMI, NICs and the kernel command line.
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
    pub token: BootstrapToken,
    pub identity: MachineIdentity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    /// PEM CSR for the node's enrollment key; the server returns a client certificate for it.
    pub csr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnrollStatus {
    /// Bound to a node; `node` and `client_cert` are set.
    Enrolled,
    /// Unknown machine queued for `imgbuild nodes approve`; ask again later.
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
    pub message: String,
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
    TokenRole,
    TokenExhausted,
    UnknownMachine,
    IdentityConflict,
    NotEnrolled,
    CsrRefused,
    RateLimited,
    Internal,
}

impl ErrorCode {
    /// Errors worth retrying: the server may answer differently later.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::RateLimited | ErrorCode::Internal)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub error: String,
}
