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
/// `POST`: a machine asks to be bound to a node ([`EnrollRequest`] → [`EnrollResponse`]).
pub const PATH_ENROLL: &str = "/v1/enroll";
/// `GET` with the node's client certificate: its [`NodeConfig`].
pub const PATH_CONFIG: &str = "/v1/config";
/// `POST` with the node's client certificate: [`SignRequest`] → [`SignResponse`].
pub const PATH_SIGN: &str = "/v1/sign";
/// `POST` with the node's client certificate: one [`Report`] per phase transition.
pub const PATH_REPORT: &str = "/v1/report";
/// `POST` by a master: [`LeaseRequest`] → [`LeaseResponse`], so one master applies the cluster objects.
pub const PATH_BOOTSTRAP_LEASE: &str = "/v1/bootstrap-lease";
/// `GET`, open: 200 while the server can answer.
pub const PATH_HEALTH: &str = "/healthz";
/// `GET`, open: Prometheus exposition text.
pub const PATH_METRICS: &str = "/metrics";
/// The operator's calls.
pub const PATH_NODES: &str = "/v1/nodes";
/// `POST` [`ApproveRequest`] (operator).
pub const PATH_NODES_APPROVE: &str = "/v1/nodes/approve";
/// `POST` [`ResetRequest`] (operator).
pub const PATH_NODES_RESET: &str = "/v1/nodes/reset";
/// `POST` [`RevokeRequest`] → [`RevokeResponse`] (operator).
pub const PATH_NODES_REVOKE: &str = "/v1/nodes/revoke";
/// Open (no credential): what a machine needs to find and pin the server, never a secret.
pub const PATH_PAYLOAD_ROLE: &str = "/v1/payload/role/{role}";
/// Open: the payload of one inventory node by name (see [`payload_node_path`]).
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
/// Bytes of exporter output the channel binding uses.
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
    /// Nothing to identify the machine by.
    #[error("the identity has neither an SMBIOS UUID nor a MAC address")]
    Empty,
    /// More than [`limits::MACS`] MAC addresses (the count given).
    #[error("the identity has {0} MAC addresses (at most {max})", max = limits::MACS)]
    TooManyMacs(usize),
    /// A MAC that does not parse (its first 40 characters).
    #[error("'{0}' is not a MAC address (six hex pairs separated by ':' or '-')")]
    Mac(String),
    /// The UUID or serial is too long or has control characters.
    #[error("the SMBIOS {field} is over {max} characters or not printable", max = limits::IDENTITY_FIELD)]
    Field {
        /// `UUID` or `serial`.
        field: &'static str,
    },
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

    /// Neither a UUID nor a MAC: nothing to bind the machine by.
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
    /// The role the image was baked for.
    pub role: Role,
    /// The Kubernetes version of the binaries in the image (`v1.20.2`).
    pub kubernetes_version: String,
    /// Component name → version, for every pinned component in the image.
    #[serde(default)]
    pub components: BTreeMap<String, String>,
    /// The reference of the sandbox (pause) image the image carries, for containerd's
    /// `sandbox_image`; none: the renderer's default, pulled at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_image: Option<String>,
}

/// The body of `POST` [`PATH_ENROLL`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnrollRequest {
    /// The client's [`PROTOCOL_VERSION`]; the server refuses others with `unsupported-protocol`.
    pub protocol: u32,
    /// The machine's credential: its own one-time credential, or the worker token. Without one
    /// the machine waits for the operator's approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<BootstrapToken>,
    /// Who the machine says it is: selects its inventory entry.
    pub identity: MachineIdentity,
    /// The image the machine booted, from [`crate::paths::IMAGE_INFO`] (absent on a foreign image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    /// PEM CSR for the node's enrollment key, bound to this connection (see the module docs);
    /// the server returns a client certificate for it.
    pub csr: String,
}

/// Whether an enrollment bound the machine or must wait for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnrollStatus {
    /// Bound to a node; `node` and `client_cert` are set.
    Enrolled,
    /// Waits for `imgbuild nodes approve`; ask again later, with the same key.
    Pending,
}

/// The node a machine was bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeAssignment {
    /// The node's name (its hostname and Kubernetes node name).
    pub name: String,
    /// The role the node is configured for.
    pub role: Role,
}

/// The answer to `POST` [`PATH_ENROLL`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnrollResponse {
    /// Enrolled, or pending the operator's approval.
    pub status: EnrollStatus,
    /// The node the machine is now bound to (set when enrolled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeAssignment>,
    /// PEM client certificate for the enrollment key (signed by the enrollment CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// Pending: seconds to wait before asking again (firstboot waits 30 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u32>,
    /// A human-readable account of the decision, for the node's log.
    pub message: String,
}

/// What a certificate is for. The server derives subject, SANs, key usages, EKUs and validity
/// from the purpose and the inventory; nothing of that is taken from the CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertPurpose {
    /// kube-apiserver's serving certificate (VIP, node address and service names as SANs).
    Apiserver,
    /// kube-apiserver's client certificate towards kubelets.
    ApiserverKubeletClient,
    /// kube-apiserver's client certificate towards etcd (etcd CA).
    ApiserverEtcdClient,
    /// kube-apiserver's client certificate for the aggregation layer (front-proxy CA).
    FrontProxyClient,
    /// etcd's serving certificate for clients (etcd CA).
    EtcdServer,
    /// etcd's certificate between members, server and client (etcd CA).
    EtcdPeer,
    /// The client certificate for probing etcd's `/health` (etcd CA).
    EtcdHealthcheckClient,
    /// kube-controller-manager's client certificate (`system:kube-controller-manager`).
    ControllerManager,
    /// kube-scheduler's client certificate (`system:kube-scheduler`).
    Scheduler,
    /// A cluster-admin client certificate (`system:masters`): the master's control-plane check
    /// and the cluster objects it applies.
    Admin,
    /// The kubelet's serving certificate.
    KubeletServing,
    /// kube-proxy's client certificate (`system:kube-proxy`).
    KubeProxy,
}

impl CertPurpose {
    /// Every purpose, in a fixed order.
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

    /// The kebab-case name used on the wire and in the audit log.
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

/// One certificate the node asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CsrRequest {
    /// What the certificate is for; the server decides its contents from this.
    pub purpose: CertPurpose,
    /// PEM PKCS#10 request.
    pub csr: String,
}

/// The body of `POST` [`PATH_SIGN`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignRequest {
    /// One request per key the node generated.
    pub csrs: Vec<CsrRequest>,
}

/// A certificate the server issued for one [`CsrRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IssuedCert {
    /// The purpose it was requested for.
    pub purpose: CertPurpose,
    /// PEM certificate.
    pub cert: String,
    /// PEM of the CA that issued it.
    pub ca: String,
}

/// The answer to `POST` [`PATH_SIGN`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignResponse {
    /// One certificate per request, in request order.
    pub certs: Vec<IssuedCert>,
}

/// In a [`FileSpec`] with `expand`, stands for the name of the node's network interface.
pub const INTERFACE_PLACEHOLDER: &str = "@@INTERFACE@@";

/// A file the node writes, atomically, with this mode and owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileSpec {
    /// Absolute path on the node.
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
    /// What the certificate is for.
    pub purpose: CertPurpose,
    /// Where the node writes the private key it generates (0600).
    pub key_path: String,
    /// Where the node writes the issued certificate.
    pub cert_path: String,
    /// `user` or `user:group` owning both files; root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A systemd unit the node enables and/or starts in the start-services phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UnitSpec {
    /// The unit name (`kubelet.service`).
    pub name: String,
    /// Enable it, so that it starts on later boots.
    pub enable: bool,
    /// Start it now.
    pub start: bool,
    /// Restart instead of start: the unit may already run with the image's configuration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
}

/// Host settings the node applies in the host-setup phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostSetup {
    /// The hostname to set (the node name).
    pub hostname: String,
    /// Kernel parameters (`net.ipv4.ip_forward` → `1`) written under /proc/sys.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// Kernel modules to load with modprobe.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Turn swap off (the kubelet refuses to run with swap).
    #[serde(default)]
    pub swap_off: bool,
    /// Filesystems to mount.
    #[serde(default)]
    pub data_disks: Vec<DataDisk>,
    /// A static address for the node's NIC. The server sets none: the payload carries it
    /// ([`crate::bootcfg::BootConfig::network`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<StaticNetwork>,
    /// The node's NIC: its MAC from the inventory, else the address it must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_mac: Option<String>,
    /// The node's address in CIDR form (`10.0.0.11/24`): finds its NIC when there is no MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_address: Option<String>,
}

/// A filesystem found by its label and mounted at `mount_point`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DataDisk {
    /// The filesystem label to find the disk by.
    pub label: String,
    /// Absolute path to mount it at.
    pub mount_point: String,
    /// Filesystem type (`ext4`, `xfs`).
    pub fstype: String,
    /// A missing disk fails host setup; otherwise it is skipped.
    #[serde(default)]
    pub required: bool,
}

/// How the node joins Kubernetes once its services run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JoinSpec {
    /// The API through the VIP, `https://VIP:port`.
    pub api_server: String,
    /// The Kubernetes node name the kubelet registers.
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
    /// Masters: taints to put on the node once it is registered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_taints: Vec<Taint>,
    /// Masters: wait for the local control plane before joining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneCheck>,
}

/// How a master checks its local control plane before joining; paths are files on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlPlaneCheck {
    /// etcd client URL to check `/health` on, with a client cert.
    pub etcd_url: String,
    /// The etcd CA certificate to verify etcd with.
    pub etcd_ca: String,
    /// The etcd client certificate.
    pub etcd_cert: String,
    /// The etcd client key.
    pub etcd_key: String,
    /// The local apiserver (`https://<node ip>:6443`), checked at `/readyz`.
    pub apiserver_url: String,
    /// The cluster CA certificate to verify the apiserver with.
    pub ca: String,
    /// Admin credentials, used for `/readyz` and to apply the cluster objects.
    pub admin_cert: String,
    /// The admin key.
    pub admin_key: String,
}

/// A Kubernetes node taint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Taint {
    /// The taint key (`node-role.kubernetes.io/master`).
    pub key: String,
    /// The taint value; empty for none.
    #[serde(default)]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// Everything a node needs, rendered by the server for that node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    /// The node's name and role.
    pub node: NodeAssignment,
    /// The Kubernetes version the node runs (`v1.20.2`): its image's, else the cluster's pin.
    pub kubernetes_version: String,
    /// Host settings for the host-setup phase.
    pub host: HostSetup,
    /// Files to write in the write-files phase.
    pub files: Vec<FileSpec>,
    /// Keys to generate and certificates to request for them.
    pub certs: Vec<CertSpec>,
    /// Units to enable and start, in order.
    pub units: Vec<UnitSpec>,
    /// How to join Kubernetes; absent for nodes that do not run a kubelet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinSpec>,
}

/// The first-boot phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Finding the machine's identity (DMI, NICs, kernel command line).
    Identify,
    /// Enrolling with the server for a node and a client certificate.
    Enroll,
    /// Fetching the node's config and its certificates.
    Fetch,
    /// Writing the config's files, keys and certificates.
    WriteFiles,
    /// Hostname, sysctls, modules, swap and data disks.
    HostSetup,
    /// Enabling and starting the config's units.
    StartServices,
    /// Joining Kubernetes (discovery, bootstrap kubeconfig, kubelet).
    Join,
    /// The final phase: the node reports its outcome ("joined", "control plane ready").
    Done,
}

impl Phase {
    /// Every phase, in the order they run.
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

    /// The kebab-case name used on the wire and in reports.
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

    /// The phase after this one; `None` after [`Phase::Done`].
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

/// Where a phase is, as a [`Report`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseStatus {
    /// The phase began.
    Started,
    /// The phase finished.
    Succeeded,
    /// The phase failed: this run of firstboot stops.
    Failed,
    /// The phase failed and will be tried again.
    Retrying,
}

impl PhaseStatus {
    /// The kebab-case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseStatus::Started => "started",
            PhaseStatus::Succeeded => "succeeded",
            PhaseStatus::Failed => "failed",
            PhaseStatus::Retrying => "retrying",
        }
    }
}

/// The body of `POST` [`PATH_REPORT`]: one phase transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Report {
    /// The phase the report is about.
    pub phase: Phase,
    /// Where that phase is.
    pub status: PhaseStatus,
    /// At most [`limits::REPORT_MESSAGE`] bytes.
    pub message: String,
    /// A failure's stable code (firstboot's `PhaseError::code`), for counting and matching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// When the phase started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// When this report was made.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `/proc/sys/kernel/random/boot_id`: tells reports of different boots apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// The body of `POST` [`PATH_BOOTSTRAP_LEASE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaseRequest {
    /// `acquire` to take (or renew) the bootstrap lease, `release` once the objects are applied.
    pub action: LeaseAction,
}

/// What a master does with the bootstrap lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseAction {
    /// Take the lease, or renew it if this node holds it.
    Acquire,
    /// The holder applied the objects: no master needs to apply them again.
    Complete,
}

/// The answer to `POST` [`PATH_BOOTSTRAP_LEASE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaseResponse {
    /// This node holds the lease and must apply `objects`.
    pub granted: bool,
    /// The objects were already applied by some master: nothing to do.
    pub completed: bool,
    /// The node that holds the lease, if any.
    pub holder: Option<String>,
    /// Kubernetes objects (JSON) to create or update, in order.
    #[serde(default)]
    pub objects: Vec<serde_json::Value>,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request does not parse or is not valid.
    BadRequest,
    /// The client speaks another [`PROTOCOL_VERSION`].
    UnsupportedProtocol,
    /// The credential is unknown or malformed.
    InvalidToken,
    /// The credential is past its expiry.
    TokenExpired,
    /// The operator revoked the credential.
    TokenRevoked,
    /// The credential has been used as often as it may.
    TokenExhausted,
    /// This machine may not enroll this way. Deliberately unspecific (the inventory is not for
    /// whoever asks); the operator sees the reason in `imgbuild nodes` and the audit log.
    Refused,
    /// The client certificate is not that of an enrolled node.
    NotEnrolled,
    /// The node's enrollment was revoked by the operator.
    Revoked,
    /// A CSR does not parse, is not signed by its key, or asks for what the node may not have.
    CsrRefused,
    /// The request or a field of it is over a [`limits`] value.
    TooLarge,
    /// Too many refused requests from this source: try again later.
    RateLimited,
    /// The server failed (its store, a signature): try again later.
    Internal,
}

impl ErrorCode {
    /// Errors worth retrying: the server may answer differently later.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::RateLimited | ErrorCode::Internal)
    }

    /// The kebab-case name used on the wire.
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

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ErrorBody {
    /// What went wrong, for the client to act on.
    pub code: ErrorCode,
    /// What went wrong, for a human.
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
    /// Bound to a node.
    Enrolled,
    /// Its enrollment was revoked: its certificate is refused until `imgbuild nodes reset`.
    Revoked,
}

impl MachineState {
    /// The kebab-case name shown by `imgbuild nodes`.
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
    /// The kebab-case name shown by `imgbuild nodes`.
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
    /// When the attempt was made.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The address the attempt came from.
    pub source: String,
    /// `sha256:` of the key that tried.
    pub key: String,
    /// The identity key ([`MachineIdentity::key`]) of the machine that tried.
    pub machine: String,
}

/// One row of `imgbuild nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The machine's identity key ([`MachineIdentity::key`]).
    pub machine: String,
    /// The node it is bound to, if any.
    pub node: Option<String>,
    /// The node's role, or the role it would get.
    pub role: Role,
    /// Where the machine is: pending, approved, enrolled or revoked.
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
    /// The phase of the node's last report.
    pub phase: Option<Phase>,
    /// The status of the node's last report.
    pub status: Option<PhaseStatus>,
    /// The message of the node's last report; empty when none.
    pub message: String,
    /// When the node last reported.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_report_at: Option<OffsetDateTime>,
    /// When the machine was bound to its node.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub enrolled_at: Option<OffsetDateTime>,
    /// The node's recent failures (`phase: message`), oldest first.
    pub errors: Vec<String>,
    /// Recent attempts by another key or machine to enroll as this node.
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
    /// How many certificates the server issued to the node.
    pub certificates: usize,
}

/// `POST /v1/nodes/approve`: a pending machine (identity key, MAC or UUID), optionally one key of
/// it, becomes a node (the inventory's, or `name` with `role`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApproveRequest {
    /// The pending machine: its identity key, a MAC or a UUID.
    pub machine: String,
    /// `sha256:` of the one key to approve, when the machine asked with several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The node to make it, for a machine not in the inventory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The role of the node `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// `POST /v1/nodes/reset`: unbind a node, so that a machine may enroll as it again (with a new
/// credential or the operator's approval).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResetRequest {
    /// The node to unbind.
    pub node: String,
}

/// `POST /v1/nodes/revoke`: refuse a node's certificate from its next request on; by node, or
/// every node that enrolled with a credential (token id).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevokeRequest {
    /// The node to revoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Revoke every node that enrolled with this credential (token id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The answer to `POST` [`PATH_NODES_REVOKE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevokeResponse {
    /// The nodes whose enrollment was revoked.
    pub revoked: Vec<String>,
}
