//! Validated cluster settings. Constructed only by [`super::validate`], so every value here has
//! been checked against the others.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use proto::Role;

use super::raw;

/// A cluster as `cluster.yaml` describes it, validated, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `metadata.name`: names the cluster in kubeconfigs, payloads and image names.
    pub name: String,
    /// Versions the cluster pins; unset ones follow the images.
    pub versions: Versions,
    /// Pod and service address ranges and cluster DNS.
    pub networks: Networks,
    /// Where the Kubernetes API is reached (the VIP the masters share).
    pub api: ApiEndpoint,
    /// Where the etcd members run.
    pub etcd: EtcdTopology,
    /// How machines find `imgbuild serve` and which of them may enroll.
    pub enrollment: Enrollment,
    /// Key algorithm and validity of the cluster's CAs and certificates.
    pub pki: PkiSettings,
    /// Every node's operating system: DNS, NTP, operators' SSH keys.
    pub hosts: super::Hosts,
    /// Extra flags and configuration of the Kubernetes components.
    pub components: super::Components,
    /// How nodes booted by PXE keep their state.
    pub pxe: Pxe,
    /// The inventory: every node known in advance, in manifest order.
    pub nodes: Vec<Node>,
}

/// `spec.versions`: versions the cluster must run. Bakes and enrollment refuse an image whose
/// Kubernetes differs from a pinned one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    /// The Kubernetes release; `None` runs what the images carry.
    pub kubernetes: Option<KubeVersion>,
    /// The etcd version, as written (recorded in the resolved manifest).
    pub etcd: Option<String>,
    /// The containerd version, as written (recorded in the resolved manifest).
    pub containerd: Option<String>,
}

/// A Kubernetes release, `v1.20.2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KubeVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version: picks the flags and config formats the rendered files use.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl FromStr for KubeVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a Kubernetes version (expected vMAJOR.MINOR.PATCH, e.g. v1.31.4)");
        let v = s.strip_prefix('v').unwrap_or(s);
        let mut it = v.splitn(3, '.').map(|p| p.parse::<u32>().map_err(|_| bad()));
        let (major, minor, patch) =
            (it.next().ok_or_else(bad)??, it.next().ok_or_else(bad)??, it.next().ok_or_else(bad)??);
        Ok(KubeVersion { major, minor, patch })
    }
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// `spec.networks`: the cluster's address plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Networks {
    /// Addresses for pods, split into one range per node.
    pub pod_cidr: Ipv4Net,
    /// Addresses for Service ClusterIPs.
    pub service_cidr: Ipv4Net,
    /// The cluster DNS Service's address, in the service CIDR.
    pub cluster_dns: Ipv4Addr,
    /// The cluster's DNS domain (`cluster.local`).
    pub dns_domain: String,
    /// Prefix length of each node's share of the pod CIDR.
    pub node_cidr_mask: u8,
    /// How pods on different nodes reach each other.
    pub pod_network: PodNetwork,
}

/// `spec.networks.podNetwork`: who carries pod traffic between nodes. Either way the
/// controller-manager gives each node its range (`Node.spec.podCIDR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// `mode: bgp`: the CNI bridge on each node (containerd writes its config with the node's
    /// range), BIRD 2 announcing the range over iBGP to the masters, which reflect every node's
    /// range to every other node; no NAT inside the pod CIDR.
    Bgp {
        /// The cluster's autonomous system number.
        asn: u32,
    },
    /// `mode: external`: no CNI configuration and no BIRD; the operator installs a network add-on
    /// (Calico, Cilium, flannel) once the control plane is up.
    External,
}

impl PodNetwork {
    /// The AS number of the reference cluster (the first private 16-bit one, RFC 6996).
    pub const DEFAULT_ASN: u32 = 64512;
}

impl Networks {
    /// The `kubernetes` Service's ClusterIP: the first address of the service CIDR.
    pub fn first_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.service_cidr.network()) + 1)
    }
}

/// `spec.apiEndpoint`: the Kubernetes API's address, held by keepalived on one master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiEndpoint {
    /// The virtual IP the masters share.
    pub vip: Ipv4Addr,
    /// The port haproxy serves the API on at the VIP.
    pub port: u16,
}

impl ApiEndpoint {
    /// `https://VIP:port`, the API URL of every kubeconfig.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.vip, self.port)
    }
}

/// `spec.etcd.topology`: which nodes run the etcd members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdTopology {
    /// Each master runs an etcd member.
    Stacked,
    /// Nodes with role `etcd` are the members.
    External,
}

impl EtcdTopology {
    /// The manifest's word: `stacked` or `external`.
    pub fn as_str(self) -> &'static str {
        match self {
            EtcdTopology::Stacked => "stacked",
            EtcdTopology::External => "external",
        }
    }
}

/// `spec.pxe`: what a node booted by PXE (no disk image) uses for its writable state (`/etc`'s
/// upper layer, `/var`, `/root`), per role; it goes on the kernel command line of the role's
/// iPXE scripts as `imgbuild.state=`, which the initramfs obeys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pxe {
    /// `state.master`: never [`PxeState::Ram`] (etcd's member data lives in `/var`).
    pub master: PxeState,
    /// `state.worker`.
    pub worker: PxeState,
    /// `state.etcd`: never [`PxeState::Ram`].
    pub etcd: PxeState,
}

impl Pxe {
    /// The state of a role's PXE boots.
    pub fn state(&self, role: Role) -> PxeState {
        match role {
            Role::Master => self.master,
            Role::Worker => self.worker,
            Role::Etcd => self.etcd,
        }
    }
}

impl Default for Pxe {
    /// Roles with an etcd member keep it on disk; workers keep their state in RAM unless a disk
    /// is labelled for it.
    fn default() -> Self {
        Pxe { master: PxeState::Disk, worker: PxeState::Ram, etcd: PxeState::Disk }
    }
}

/// Where a PXE-booted node's writable state lives. Every mode uses the partition labelled
/// `imgbuild-state` when there is one (a disk image's, or one made by an earlier boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PxeState {
    /// `disk`: without the labelled partition, one is made on the first empty disk (no partition
    /// table, no file system signature); with neither, the boot stops with the reason.
    Disk,
    /// `label`: only the labelled partition; no disk is ever formatted; without it the boot stops.
    Label,
    /// `ram`: without the labelled partition, RAM (lost at every reboot).
    Ram,
}

impl PxeState {
    /// Every mode, in the manifest's words.
    pub const ALL: [PxeState; 3] = [PxeState::Disk, PxeState::Label, PxeState::Ram];

    /// The manifest's and the kernel command line's word.
    pub fn as_str(self) -> &'static str {
        match self {
            PxeState::Disk => "disk",
            PxeState::Label => "label",
            PxeState::Ram => "ram",
        }
    }
}

/// `spec.enrollment`: how machines enroll with `imgbuild serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// Where nodes find the enrollment server, tried in order; its certificate names these hosts.
    pub servers: Vec<ServerUrl>,
    /// What happens to machines not in the inventory.
    pub policy: EnrollPolicy,
    /// How long a node's one-time credential and the worker token stay valid.
    pub enrollment_token_ttl: Duration,
    /// How long the Kubernetes bootstrap (join) token stays valid.
    pub join_token_ttl: Duration,
}

/// An enrollment server URL, `https://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port; 443 when the URL has none.
    pub port: u16,
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("https://")
            .ok_or_else(|| format!("'{s}' must be an https:// URL (enrollment carries secrets)"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!("'{s}' must be https://HOST[:PORT] without a path"));
        }
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| format!("'{s}' has an unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("'{s}' has no host"));
        }
        let port = match port {
            None => 443,
            Some(p) => p.parse().map_err(|_| format!("'{s}' has an invalid port '{p}' (1-65535)"))?,
        };
        if port == 0 {
            return Err(format!("'{s}' has port 0 (1-65535)"));
        }
        Ok(ServerUrl { host: host.to_string(), port })
    }
}

/// `spec.enrollment.policy`: what the server does with machines not in the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollPolicy {
    /// Machines not in the inventory are refused.
    KnownOnly,
    /// Unknown machines wait for `imgbuild nodes approve`.
    Approve,
    /// Unknown machines become workers with generated names.
    AutoWorker,
}

impl EnrollPolicy {
    /// Every policy's name, for error messages.
    pub const NAMES: &'static str = "known-only, approve, auto-worker";
    /// The manifest's word (`known-only`, `approve`, `auto-worker`).
    pub fn as_str(self) -> &'static str {
        match self {
            EnrollPolicy::KnownOnly => "known-only",
            EnrollPolicy::Approve => "approve",
            EnrollPolicy::AutoWorker => "auto-worker",
        }
    }
}

impl FromStr for EnrollPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "known-only" => Ok(EnrollPolicy::KnownOnly),
            "approve" => Ok(EnrollPolicy::Approve),
            "auto-worker" => Ok(EnrollPolicy::AutoWorker),
            _ => Err(format!("valid policies: {}", EnrollPolicy::NAMES)),
        }
    }
}

/// `spec.pki.keyAlgorithm`: the key type of every key the cluster's PKI makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 (the default).
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// RSA with 2048-bit keys.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

impl KeyAlgorithm {
    /// Every algorithm's name, for error messages.
    pub const NAMES: &'static str = "ecdsa-p256, rsa-2048";
    /// The manifest's word (`ecdsa-p256`, `rsa-2048`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
        }
    }
}

impl FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ecdsa-p256" => Ok(KeyAlgorithm::EcdsaP256),
            "rsa-2048" => Ok(KeyAlgorithm::Rsa2048),
            _ => Err(format!("valid algorithms: {}", KeyAlgorithm::NAMES)),
        }
    }
}

/// `spec.pki`: key algorithm and lifetimes of the cluster's PKI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PkiSettings {
    /// The key type of CAs and leaf certificates.
    pub key_algorithm: KeyAlgorithm,
    /// How long a new CA certificate is valid.
    pub ca_validity: Duration,
    /// How long a leaf certificate is valid.
    pub cert_validity: Duration,
}

/// A MAC address, normalized to lowercase with colons.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(String);

impl Mac {
    /// `52:54:00:03:01:11`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err("expected six hex octets like 52:54:00:03:01:11".into());
        }
        let first = u8::from_str_radix(parts[0], 16).map_err(|_| format!("'{}' is not a hex octet", parts[0]))?;
        if first & 1 == 1 {
            return Err("a multicast address cannot identify a NIC (first octet must be even)".into());
        }
        Ok(Mac(parts.join(":").to_ascii_lowercase()))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An SMBIOS system UUID, normalized to lowercase 8-4-4-4-12.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SmbiosUuid(String);

impl SmbiosUuid {
    /// The UUID, lowercase 8-4-4-4-12.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SmbiosUuid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] || !groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err("expected a UUID like 4c4c4544-0042-3510-8052-b4c04f4d4e31".into());
        }
        Ok(SmbiosUuid(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for SmbiosUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An inventory node: a machine known in advance, found by its MAC or UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// RFC 1123 label; also the hostname and the Kubernetes Node name.
    pub name: String,
    /// What the node runs.
    pub role: Role,
    /// The MAC of its NIC: identifies the machine and names the interface to configure.
    pub mac: Option<Mac>,
    /// Its SMBIOS UUID: identifies the machine.
    pub uuid: Option<SmbiosUuid>,
    /// Host address with the subnet's prefix length.
    pub address: Ipv4Net,
    /// Its default gateway, for a static address.
    pub gateway: Option<Ipv4Addr>,
    /// OpenSSH keys for root on this node, besides `spec.hosts.sshAuthorizedKeys`.
    pub ssh_authorized_keys: Vec<String>,
}

impl Node {
    /// The node's address without the prefix length.
    pub fn ip(&self) -> Ipv4Addr {
        self.address.addr()
    }
}

impl Cluster {
    /// The inventory node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The inventory nodes of one role, in manifest order.
    pub fn nodes_with(&self, role: Role) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(move |n| n.role == role)
    }

    /// The masters, in manifest order.
    pub fn masters(&self) -> impl Iterator<Item = &Node> {
        self.nodes_with(Role::Master)
    }

    /// The etcd members: the masters (stacked) or the etcd nodes (external).
    pub fn etcd_members(&self) -> impl Iterator<Item = &Node> {
        let role = match self.etcd {
            EtcdTopology::Stacked => Role::Master,
            EtcdTopology::External => Role::Etcd,
        };
        self.nodes_with(role)
    }

    /// The raw form with every default filled in (what `to_yaml` writes).
    pub(crate) fn to_raw(&self) -> raw::RawCluster {
        use raw::*;
        let n = &self.networks;
        RawCluster {
            api_version: Some(API_VERSION.into()),
            kind: Some(KIND.into()),
            metadata: RawMetadata { name: Some(self.name.clone()) },
            spec: RawSpec {
                versions: RawVersions {
                    kubernetes: self.versions.kubernetes.map(|v| v.to_string()),
                    etcd: self.versions.etcd.clone(),
                    containerd: self.versions.containerd.clone(),
                },
                networks: RawNetworks {
                    pod_cidr: Some(n.pod_cidr.to_string()),
                    service_cidr: Some(n.service_cidr.to_string()),
                    cluster_dns: Some(n.cluster_dns.to_string()),
                    dns_domain: Some(n.dns_domain.clone()),
                    node_cidr_mask_size: Some(Scalar::Int(n.node_cidr_mask.into())),
                    pod_network: match n.pod_network {
                        PodNetwork::Bgp { asn } => {
                            RawPodNetwork { mode: Some("bgp".into()), asn: Some(Scalar::Int(asn.into())) }
                        }
                        PodNetwork::External => RawPodNetwork { mode: Some("external".into()), asn: None },
                    },
                },
                api_endpoint: RawApiEndpoint {
                    vip: Some(self.api.vip.to_string()),
                    port: Some(Scalar::Int(self.api.port.into())),
                },
                etcd: RawEtcd { topology: Some(self.etcd.as_str().into()) },
                enrollment: RawEnrollment {
                    servers: Some(self.enrollment.servers.iter().map(ToString::to_string).collect()),
                    policy: Some(self.enrollment.policy.as_str().into()),
                    enrollment_token_ttl: Some(format_duration(self.enrollment.enrollment_token_ttl)),
                    join_token_ttl: Some(format_duration(self.enrollment.join_token_ttl)),
                },
                hosts: self.hosts.to_raw(),
                components: self.components.to_raw(),
                pxe: Some(RawPxe {
                    state: Some(
                        Role::ALL.iter().map(|&r| (r.to_string(), self.pxe.state(r).as_str().to_string())).collect(),
                    ),
                }),
                pki: RawPki {
                    key_algorithm: Some(self.pki.key_algorithm.as_str().into()),
                    ca_validity: Some(format_duration(self.pki.ca_validity)),
                    cert_validity: Some(format_duration(self.pki.cert_validity)),
                },
                nodes: self
                    .nodes
                    .iter()
                    .map(|node| RawNode {
                        name: Some(node.name.clone()),
                        role: Some(node.role.to_string()),
                        mac: node.mac.as_ref().map(ToString::to_string),
                        uuid: node.uuid.as_ref().map(ToString::to_string),
                        address: Some(node.address.to_string()),
                        gateway: node.gateway.map(|g| g.to_string()),
                        ssh_authorized_keys: (!node.ssh_authorized_keys.is_empty())
                            .then(|| node.ssh_authorized_keys.clone()),
                    })
                    .collect(),
            },
        }
    }
}

/// `90s`, `30m`, `24h`, `7d`: a count and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration (expected a whole number and a unit: 90s, 30m, 24h, 7d)");
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(unit_at);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs).map(Duration::from_secs).ok_or_else(bad)
}

/// The shortest of `24h`, `30m` or `90s` that says `d` exactly (whole seconds), as
/// [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// RFC 1123 label: 1-63 of [a-z0-9-], starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}
