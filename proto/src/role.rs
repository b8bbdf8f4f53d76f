//! Node roles.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a machine becomes in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Control plane: kube-apiserver, controller-manager, scheduler, haproxy + keepalived for the
    /// API VIP, and (stacked topology) an etcd member.
    Master,
    /// Runs workloads: kubelet, kube-proxy, containerd.
    Worker,
    /// A dedicated etcd member (external etcd topology).
    Etcd,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Master, Role::Worker, Role::Etcd];

    /// The lowercase name used in manifests, image names and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Worker => "worker",
            Role::Etcd => "etcd",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not `master`, `worker` or `etcd` (the name given).
#[derive(Debug, thiserror::Error)]
#[error("unknown role '{0}' (valid: master, worker, etcd)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_string()))
    }
}
