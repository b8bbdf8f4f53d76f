//! Renders each node's role config ([`NodeConfig`]): the files it writes (with modes), the keys
//! it generates and the certificates it requests for them, the units it starts, and how it
//! joins. Everything that depends on the whole inventory (etcd's initial cluster, haproxy's
//! backends, routes to other nodes' pod ranges) is known here, which is why the server renders
//! and the node only applies.

use std::path::Path;

use anyhow::{Context, Result};
use firstboot::Role;
use firstboot::paths;
use firstboot::proto::*;
use serde_json::Value;
use time::OffsetDateTime;

use super::fleet::{ApiError, Fleet, NodeRecord};
use crate::cluster::Cluster;
use crate::kube;
use crate::pki::{CaKind, leaf_spec};
use crate::state::State;
use crate::tokens::{DEFAULT_NODE_GROUP, TokenStore};

/// A secret file masters receive from the state dir.
struct MasterSecret {
    node_path: &'static str,
    contents: String,
}

pub struct Renderer {
    cluster: Cluster,
    ca_pems: Vec<(CaKind, String)>,
    master_secrets: Vec<MasterSecret>,
    tokens_path: std::path::PathBuf,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

impl Renderer {
    pub fn new(state: &State, cluster: &Cluster) -> Result<Self> {
        let pki = state.pki_dir();
        let mut ca_pems = Vec::new();
        for kind in [CaKind::Cluster, CaKind::Etcd, CaKind::FrontProxy] {
            ca_pems.push((kind, read(&pki.join(kind.cert_file()))?));
        }
        // Masters hold the CA keys (kube-controller-manager signs kubelet certificates) and the
        // service-account key pair; workers never receive them.
        let mut master_secrets = Vec::new();
        for (rel, node_path) in [
            ("ca.key", "/etc/kubernetes/pki/ca.key"),
            ("front-proxy-ca.key", "/etc/kubernetes/pki/front-proxy-ca.key"),
            ("etcd/ca.key", "/etc/kubernetes/pki/etcd/ca.key"),
            ("sa.key", "/etc/kubernetes/pki/sa.key"),
            ("sa.pub", "/etc/kubernetes/pki/sa.pub"),
        ] {
            master_secrets.push(MasterSecret { node_path, contents: read(&pki.join(rel))? });
        }
        Ok(Renderer { cluster: cluster.clone(), ca_pems, master_secrets, tokens_path: state.tokens_file() })
    }

    fn ca_pem(&self, kind: CaKind) -> &str {
        &self.ca_pems.iter().find(|(k, _)| *k == kind).expect("loaded at start").1
    }

    fn join_token(&self) -> Result<firstboot::BootstrapToken, ApiError> {
        let tokens = TokenStore::load(&self.tokens_path).map_err(|e| {
            tracing::error!("{e}");
            ApiError::new(ErrorCode::Internal, "the server cannot read its tokens")
        })?;
        tokens.join_token(OffsetDateTime::now_utc()).map(|t| t.token.clone()).ok_or_else(|| {
            ApiError::new(ErrorCode::Internal, "no valid join token: run `imgbuild init --rotate join-token`")
        })
    }

    /// The objects the first master applies: join token Secret, node-bootstrap RBAC, cluster-info.
    pub fn cluster_objects(&self) -> Vec<Value> {
        let tokens = TokenStore::load(&self.tokens_path).ok();
        let now = OffsetDateTime::now_utc();
        let mut objects: Vec<Value> = tokens
            .iter()
            .flat_map(|t| t.records.iter())
            .filter(|t| t.is_kubernetes() && t.state(now) == crate::tokens::TokenState::Valid)
            .map(kube::bootstrap_token_secret)
            .collect();
        objects.extend(kube::node_bootstrap_rbac(DEFAULT_NODE_GROUP));
        objects.extend(kube::cluster_info(self.ca_pem(CaKind::Cluster), &self.cluster.api.url()));
        objects
    }

    pub async fn node_config(&self, fleet: &Fleet, node: &NodeRecord) -> Result<NodeConfig, ApiError> {
        let _ = fleet;
        let ident = node.identity();
        let kubernetes_version = node.image.as_ref().map(|i| i.kubernetes_version.clone()).unwrap_or_default();
        let mut files = vec![FileSpec {
            path: "/etc/kubernetes/pki/ca.crt".into(),
            mode: 0o644,
            owner: None,
            contents: self.ca_pem(CaKind::Cluster).to_string(),
        }];
        if node.role == Role::Master {
            files.push(file("/etc/kubernetes/pki/etcd/ca.crt", 0o644, self.ca_pem(CaKind::Etcd)));
            files.push(file("/etc/kubernetes/pki/front-proxy-ca.crt", 0o644, self.ca_pem(CaKind::FrontProxy)));
            for s in &self.master_secrets {
                files.push(file(s.node_path, 0o600, &s.contents));
            }
        }
        let certs = CertPurpose::ALL
            .into_iter()
            .filter(|p| leaf_spec(*p, &self.cluster, &ident).is_some())
            .map(|purpose| {
                let (cert_path, key_path) = paths::cert_paths(purpose);
                CertSpec { purpose, key_path: key_path.into(), cert_path: cert_path.into(), owner: None }
            })
            .collect();
        let join = match node.role {
            Role::Etcd => None,
            _ => Some(JoinSpec {
                api_server: self.cluster.api.url(),
                node_name: node.name.clone(),
                token: self.join_token()?,
                ca_pin: fleet.cas.cluster.pin(),
                discovery: node.role == Role::Worker,
                kubelet_unit: "kubelet.service".into(),
                bootstrap_kubeconfig: kube::kubeconfig(
                    &self.cluster.name,
                    &self.cluster.api.url(),
                    kube::CaRef::File("/etc/kubernetes/pki/ca.crt"),
                    "kubelet-bootstrap",
                    kube::Auth::Token(&self.join_token()?.expose()),
                ),
                node_labels: Default::default(),
                node_taints: vec![],
                control_plane: None,
            }),
        };
        Ok(NodeConfig {
            node: NodeAssignment { name: node.name.clone(), role: node.role },
            kubernetes_version,
            host: HostSetup { hostname: node.name.clone(), ..Default::default() },
            files,
            certs,
            units: vec![],
            join,
        })
    }
}

fn file(path: &str, mode: u32, contents: &str) -> FileSpec {
    FileSpec { path: path.into(), mode, owner: None, contents: contents.into() }
}
