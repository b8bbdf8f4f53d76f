//! `cluster.yaml` as written: serde structs that accept any scalar where a value is expected, so
//! that validation ([`super::validate`]) can report every problem at once instead of stopping at
//! the first type error. Unknown keys are collected, not rejected, for the same reason.

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "imgbuild.k8s.org/v1alpha1";
pub const KIND: &str = "Cluster";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawCluster {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: RawMetadata,
    #[serde(default)]
    pub spec: RawSpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawMetadata {
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawSpec {
    #[serde(default)]
    pub versions: RawVersions,
    #[serde(default)]
    pub networks: RawNetworks,
    #[serde(default)]
    pub api_endpoint: RawApiEndpoint,
    #[serde(default)]
    pub etcd: RawEtcd,
    #[serde(default)]
    pub enrollment: RawEnrollment,
    #[serde(default)]
    pub pki: RawPki,
    #[serde(default)]
    pub hosts: RawHosts,
    #[serde(default)]
    pub components: RawComponents,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pxe: Option<RawPxe>,
    #[serde(default)]
    pub nodes: Vec<RawNode>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawPxe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawHosts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_domains: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntp_servers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_authorized_keys: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawComponents {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apiserver: Option<RawComponent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_manager: Option<RawComponent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<RawComponent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet: Option<RawComponent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_proxy: Option<RawComponent>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawComponent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_args: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawVersions {
    pub kubernetes: Option<String>,
    pub etcd: Option<String>,
    pub containerd: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawNetworks {
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(rename = "serviceCIDR")]
    pub service_cidr: Option<String>,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Option<String>,
    pub dns_domain: Option<String>,
    #[serde(rename = "nodeCIDRMaskSize")]
    pub node_cidr_mask_size: Option<Scalar>,
    #[serde(default)]
    pub pod_network: RawPodNetwork,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawPodNetwork {
    pub mode: Option<String>,
    pub asn: Option<Scalar>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawApiEndpoint {
    pub vip: Option<String>,
    pub port: Option<Scalar>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawEtcd {
    pub topology: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawEnrollment {
    pub servers: Option<Vec<String>>,
    pub policy: Option<String>,
    #[serde(rename = "enrollmentTokenTTL")]
    pub enrollment_token_ttl: Option<String>,
    #[serde(rename = "joinTokenTTL")]
    pub join_token_ttl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RawPki {
    pub key_algorithm: Option<String>,
    pub ca_validity: Option<String>,
    pub cert_validity: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RawNode {
    pub name: Option<String>,
    pub role: Option<String>,
    pub mac: Option<String>,
    pub uuid: Option<String>,
    pub address: Option<String>,
    pub gateway: Option<String>,
    #[serde(default, rename = "sshAuthorizedKeys", skip_serializing_if = "Option::is_none")]
    pub ssh_authorized_keys: Option<Vec<String>>,
}

/// A YAML scalar that may be a number or a string; validation decides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Str(String),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Str(s) => f.write_str(s),
        }
    }
}
