//! Renders each node's role config ([`NodeConfig`]): the files it writes (with modes), the keys
//! it generates and the certificates it requests for them, the units it starts, and how it
//! joins. Everything that depends on the whole inventory (etcd's initial cluster, haproxy's
//! backends, keepalived's peers, the masters BIRD peers with) is known here, which is why the
//! server renders and the node only applies. Units and configuration files are templates
//! in `manifests/templates/node/`.
//!
//! What differs between Kubernetes versions is decided in [`Versioned`], and nowhere else:
//!
//! | choice | before | from |
//! |---|---|---|
//! | kubelet `--container-runtime=remote --container-runtime-endpoint` (else `containerRuntimeEndpoint`) | | 1.27 |
//! | `--insecure-port=0` (apiserver), `--port=0` (controller-manager, scheduler) | | 1.24 |
//! | KubeSchedulerConfiguration API | v1beta1 < 1.22 ≤ v1beta2 < 1.25 ≤ v1 | |
//! | cgroup driver (kubeadm's default) | cgroupfs | 1.22: systemd |
//! | control-plane taint | `node-role.kubernetes.io/master` | 1.24: `.../control-plane` |

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use proto::Role;
use proto::paths;
use proto::wire::*;
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::fleet::ApiError;
use super::fleet::records::NodeRecord;
use crate::cluster::{Cluster, KubeVersion, PodNetwork, exec_words};
use crate::kube;
use crate::pki::{CaKind, NodeIdentity, leaf_spec};
use crate::state::State;
use crate::templates;
use crate::tokens::{DEFAULT_NODE_GROUP, TokenRecord};

/// Rendered when a node sends no image information and the cluster pins no version.
pub const DEFAULT_KUBERNETES: &str = "v1.34.7";
/// containerd's sandbox image when the node's image carries none (then pulled at boot).
pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// The version-dependent choices (see the module docs).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Versioned {
    /// Before 1.27: the kubelet takes `--container-runtime=remote` and the endpoint as flags.
    pub runtime_flags: bool,
    /// Before 1.24: `--insecure-port=0` (apiserver) and `--port=0` (controller-manager, scheduler).
    pub insecure_port_flag: bool,
    /// The `KubeSchedulerConfiguration` apiVersion.
    pub scheduler_api: &'static str,
    /// The kubelet's and containerd's cgroup driver (`cgroupfs` or `systemd`).
    pub cgroup_driver: &'static str,
    /// The key of the masters' taint.
    pub control_plane_taint: &'static str,
}

impl Versioned {
    /// The choices for Kubernetes `v`.
    pub fn of(v: KubeVersion) -> Versioned {
        let minor = if v.major > 1 { u32::MAX } else { v.minor };
        Versioned {
            runtime_flags: minor < 27,
            insecure_port_flag: minor < 24,
            scheduler_api: match minor {
                ..22 => "kubescheduler.config.k8s.io/v1beta1",
                22..25 => "kubescheduler.config.k8s.io/v1beta2",
                _ => "kubescheduler.config.k8s.io/v1",
            },
            cgroup_driver: if minor < 22 { "cgroupfs" } else { "systemd" },
            control_plane_taint: if minor < 24 {
                "node-role.kubernetes.io/master"
            } else {
                "node-role.kubernetes.io/control-plane"
            },
        }
    }
}

/// A secret file masters receive from the state dir.
struct MasterSecret {
    node_path: &'static str,
    contents: String,
}

/// Renders node configs and the cluster objects, from the state dir's CAs and master secrets.
pub struct Renderer {
    cluster: Cluster,
    ca_pems: Vec<(CaKind, String)>,
    /// The cluster CA's pin, as nodes check `cluster-info` against it.
    ca_pin: proto::pin::CaPin,
    master_secrets: Vec<MasterSecret>,
    /// The TCP MD5 password of the pod network's BGP sessions.
    bgp_password: String,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn file(path: &str, mode: u32, contents: impl Into<String>) -> FileSpec {
    FileSpec { path: path.into(), mode, owner: None, contents: contents.into(), expand: false }
}

fn unit(name: &str, start: bool, restart: bool) -> UnitSpec {
    UnitSpec { name: name.into(), enable: true, start, restart }
}

fn render(name: &str, ctx: &minijinja::Value) -> Result<String, ApiError> {
    templates::render(name, ctx).map_err(|e| {
        tracing::error!("template {name}: {e:#}");
        ApiError::new(ErrorCode::Internal, format!("cannot render {name}"))
    })
}

/// A file (0644) rendered from a template.
fn rendered(path: &str, template: &str, ctx: &minijinja::Value) -> Result<FileSpec, ApiError> {
    Ok(file(path, 0o644, render(template, ctx)?))
}

/// A systemd unit rendered from `node/NAME` into the units directory.
fn unit_file(name: &str, ctx: &minijinja::Value) -> Result<FileSpec, ApiError> {
    rendered(&format!("{}/{name}", paths::SYSTEMD_DIR), &format!("node/{name}"), ctx)
}

impl Renderer {
    /// Reads the CA certificates, the CA keys and the service-account keys from the state dir.
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
            ("ca.key", paths::CA_KEY),
            ("front-proxy-ca.key", paths::FRONT_PROXY_CA_KEY),
            ("etcd/ca.key", paths::ETCD_CA_KEY),
            ("sa.key", paths::SA_KEY),
            ("sa.pub", paths::SA_PUB),
        ] {
            master_secrets.push(MasterSecret { node_path, contents: read(&pki.join(rel))? });
        }
        let ca_pin = proto::pin::CaPin::of_cert_pem(&ca_pems[0].1).context("the cluster CA certificate")?;
        let bgp_password = read(&state.bgp_password())
            .context("the pod network's BGP password (`imgbuild init` creates it when missing)")?
            .trim()
            .to_string();
        Ok(Renderer { cluster: cluster.clone(), ca_pems, ca_pin, master_secrets, bgp_password })
    }

    #[expect(
        clippy::expect_used,
        reason = "`new` loads the cluster, etcd and front-proxy CAs, the only kinds this is asked for"
    )]
    fn ca_pem(&self, kind: CaKind) -> &str {
        &self.ca_pems.iter().find(|(k, _)| *k == kind).expect("loaded at start").1
    }

    /// The objects the first master applies: join token Secret, node-bootstrap RBAC, cluster-info,
    /// and CoreDNS when the master's `image` carries a CoreDNS image (Debian's carry none: no
    /// cluster DNS there, rather than a pod that cannot start).
    pub fn cluster_objects(&self, tokens: &[TokenRecord], image: Option<&ImageInfo>) -> Vec<Value> {
        let now = OffsetDateTime::now_utc();
        let mut objects: Vec<Value> = tokens
            .iter()
            .filter(|t| t.is_kubernetes() && t.state(now) == crate::tokens::TokenState::Valid)
            .map(kube::bootstrap_token_secret)
            .collect();
        objects.extend(kube::node_bootstrap_rbac(DEFAULT_NODE_GROUP));
        objects.extend(kube::cluster_info(self.ca_pem(CaKind::Cluster), &self.cluster.api.url()));
        if let Some((reference, version)) =
            image.and_then(|i| Some((coredns_image(i)?, i.kubernetes_version.parse().ok()?)))
        {
            let n = &self.cluster.networks;
            let taint = Versioned::of(version).control_plane_taint;
            objects.extend(kube::coredns(reference, &n.cluster_dns.to_string(), &n.dns_domain, taint));
        }
        objects
    }

    /// A kubeconfig whose client certificate and key are files on the node.
    fn kubeconfig(&self, server: &str, user: &str, purpose: CertPurpose) -> String {
        let (cert, key) = paths::cert_paths(purpose);
        kube::kubeconfig(
            &self.cluster.name,
            server,
            kube::CaRef::File(paths::CA_CERT),
            user,
            kube::Auth::CertFiles { cert, key },
        )
    }

    /// A bound node's config, with the current join token among `tokens`.
    pub fn node_config(&self, node: &NodeRecord, tokens: &[TokenRecord]) -> Result<NodeConfig, ApiError> {
        let version_text = node
            .image
            .as_ref()
            .map(|i| i.kubernetes_version.clone())
            .or_else(|| self.cluster.versions.kubernetes.map(|v| v.to_string()))
            .unwrap_or_else(|| DEFAULT_KUBERNETES.to_string());
        let version: KubeVersion = version_text
            .parse()
            .map_err(|e: String| ApiError::new(ErrorCode::BadRequest, format!("image Kubernetes version: {e}")))?;
        let containerd2 = node
            .image
            .as_ref()
            .and_then(|i| i.components.get("containerd"))
            .is_some_and(|v| v.trim_start_matches('v').starts_with('2'));
        let join_token =
            crate::tokens::join_token(tokens, OffsetDateTime::now_utc()).map(|t| t.token.clone()).ok_or_else(|| {
                ApiError::new(ErrorCode::Internal, "no valid join token: run `imgbuild init --rotate join-token`")
            })?;
        let sandbox_image = node.image.as_ref().and_then(|i| i.sandbox_image.clone());
        let inputs = NodeInputs { version, containerd2, join_token, ca_pin: self.ca_pin, sandbox_image };
        self.render(&node.identity(), &inputs)
    }

    /// Renders a node's config from what the server knows: the node's name, role and address,
    /// and the inputs (pure: golden tests call this). Each role's part adds its files, units,
    /// sysctls and modules to one [`Parts`].
    pub fn render(&self, node: &NodeIdentity, inputs: &NodeInputs) -> Result<NodeConfig, ApiError> {
        let c = &self.cluster;
        let v = Versioned::of(inputs.version);
        let node_ip = node.ip.map(|ip| ip.to_string());
        let master = node.role == Role::Master;
        let (serving_cert, serving_key) = paths::cert_paths(CertPurpose::KubeletServing);
        let taint = master.then(|| format!("{}:NoSchedule", v.control_plane_taint));
        // Built once; the per-template additions are layered over it, not copies of it.
        let ctx = minijinja::context! {
            node => node.name, role => node.role, node_ip => node_ip, cluster => c.name, v => v,
            cluster_dns => c.networks.cluster_dns.to_string(), dns_domain => c.networks.dns_domain,
            pod_cidr => c.networks.pod_cidr.to_string(), service_cidr => c.networks.service_cidr.to_string(),
            node_mask => c.networks.node_cidr_mask, taint => taint,
            serving_cert => serving_cert, serving_key => serving_key,
            cni_template => matches!(c.networks.pod_network, PodNetwork::Bgp { .. }).then_some(paths::CNI_TEMPLATE), vip => c.api.vip.to_string(), port => c.api.port,
            containerd2 => inputs.containerd2, systemd_cgroup => v.cgroup_driver == "systemd",
            pause_image => inputs.sandbox_image.as_deref().unwrap_or(DEFAULT_SANDBOX_IMAGE),
            apiserver_args => exec_words(&c.components.apiserver),
            controller_manager_args => exec_words(&c.components.controller_manager),
            scheduler_args => exec_words(&c.components.scheduler),
            kubelet_args => exec_words(&c.components.kubelet),
            kubelet_config_extra => yaml_fields(&c.components.kubelet_config),
            kube_proxy_config_extra => yaml_fields(&c.components.kube_proxy_config),
        };
        let mut p = Parts {
            files: vec![file(paths::CA_CERT, 0o644, self.ca_pem(CaKind::Cluster))],
            units: Vec::new(),
            sysctls: BTreeMap::from([
                ("net.ipv4.ip_forward".to_string(), "1".to_string()),
                ("net.bridge.bridge-nf-call-iptables".to_string(), "1".to_string()),
                ("net.bridge.bridge-nf-call-ip6tables".to_string(), "1".to_string()),
            ]),
            modules: ["overlay", "br_netfilter", "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack"]
                .map(String::from)
                .to_vec(),
        };
        let kubelet = node.role != Role::Etcd;
        if kubelet {
            self.kubelet_part(node, &ctx, &mut p)?;
        }
        let etcd_member = c.etcd_members().any(|m| m.name == node.name);
        if etcd_member {
            self.etcd_part(&ctx, &mut p)?;
        }
        if master {
            self.master_part(node, etcd_member, &ctx, &mut p)?;
        }
        if !kubelet {
            p.modules.retain(|m| m == "overlay");
        }
        let Parts { mut files, units, sysctls, modules } = p;
        let sctx = minijinja::context! { sysctls => sysctls, modules => modules };
        files.push(rendered(paths::SYSCTL_CONFIG, "node/sysctl.conf", &sctx)?);
        files.push(rendered(paths::MODULES_CONFIG, "node/modules.conf", &sctx)?);
        let certs = CertPurpose::ALL
            .into_iter()
            .filter(|p| leaf_spec(*p, c, node).is_some())
            .map(|purpose| {
                let (cert_path, key_path) = paths::cert_paths(purpose);
                CertSpec { purpose, key_path: key_path.into(), cert_path: cert_path.into(), owner: None }
            })
            .collect();
        Ok(NodeConfig {
            node: NodeAssignment { name: node.name.clone(), role: node.role },
            kubernetes_version: inputs.version.to_string(),
            host: HostSetup {
                hostname: node.name.clone(),
                sysctls,
                modules,
                swap_off: kubelet,
                data_disks: vec![],
                network: None,
                interface_mac: c.node(&node.name).and_then(|n| n.mac.as_ref()).map(ToString::to_string),
                interface_address: node_ip,
            },
            files,
            certs,
            units,
            join: kubelet.then(|| self.join_spec(node, inputs)),
        })
    }

    /// Every node with a kubelet: the container runtime, the pod network, kubelet and kube-proxy.
    fn kubelet_part(&self, node: &NodeIdentity, ctx: &minijinja::Value, p: &mut Parts) -> Result<(), ApiError> {
        let c = &self.cluster;
        if let PodNetwork::Bgp { asn } = c.networks.pod_network {
            self.pod_network_part(node, asn, ctx, p)?;
        }
        p.files.push(rendered(paths::CONTAINERD_CONFIG, "node/containerd-config.toml", ctx)?);
        p.files.push(rendered(paths::KUBELET_CONFIG, "node/kubelet-config.yaml", ctx)?);
        p.files.push(unit_file("kubelet.service", ctx)?);
        for mode in ["ipvs", "iptables"] {
            let pctx = minijinja::context! { mode => mode, ..ctx.clone() };
            p.files.push(rendered(&paths::kube_proxy_config(mode), "node/kube-proxy-config.yaml", &pctx)?);
        }
        p.files.push(unit_file("kube-proxy.service", ctx)?);
        p.files.push(file(
            paths::KUBE_PROXY_KUBECONFIG,
            0o600,
            self.kubeconfig(&c.api.url(), "system:kube-proxy", CertPurpose::KubeProxy),
        ));
        p.units.extend([
            unit("containerd.service", true, true),
            unit("kube-proxy.service", true, false),
            // Started by the join phase, once the bootstrap kubeconfig is in place.
            UnitSpec { name: "kubelet.service".into(), enable: true, start: false, restart: false },
        ]);
        Ok(())
    }

    /// `podNetwork: bgp`: the CNI bridge's config template, BIRD peering with the masters, and
    /// masquerade for what leaves the pod CIDR.
    fn pod_network_part(
        &self,
        node: &NodeIdentity,
        asn: u32,
        ctx: &minijinja::Value,
        p: &mut Parts,
    ) -> Result<(), ApiError> {
        let c = &self.cluster;
        let masters: Vec<Value> = c
            .masters()
            .map(|m| json!({"name": m.name, "ip": m.ip().to_string(), "protocol": bird_name(&m.name)}))
            .collect();
        let peers: Vec<Value> = masters.iter().filter(|m| m["name"] != node.name.as_str()).cloned().collect();
        let mut node_networks: Vec<String> = c.masters().map(|m| m.address.trunc().to_string()).collect();
        node_networks.dedup();
        let bctx = minijinja::context! {
            asn => asn,
            master => node.role == Role::Master,
            masters => masters,
            peers => peers,
            node_networks => node_networks,
            // The VIP, as a 32-bit id the masters share.
            cluster_id => c.api.vip.to_string(),
            password => self.bgp_password,
            ..ctx.clone()
        };
        let mut bird = file(paths::BIRD_CONFIG, 0o640, render("node/bird.conf", &bctx)?);
        // BIRD reads its configuration again as its own user on `birdc configure`.
        bird.owner = Some("root:bird".into());
        p.files.push(bird);
        p.files.push(rendered(paths::CNI_TEMPLATE, "node/cni.conflist", ctx)?);
        p.files.push(unit_file("imgbuild-pod-egress.service", ctx)?);
        p.units.extend([unit("imgbuild-pod-egress.service", true, false), unit("bird.service", true, true)]);
        Ok(())
    }

    /// An etcd member: its unit with the initial cluster, first among the units.
    fn etcd_part(&self, ctx: &minijinja::Value, p: &mut Parts) -> Result<(), ApiError> {
        let c = &self.cluster;
        let initial: Vec<String> = c.etcd_members().map(|m| format!("{}=https://{}:2380", m.name, m.ip())).collect();
        let ectx = minijinja::context! { initial_cluster => initial.join(","), ..ctx.clone() };
        p.files.push(file(paths::ETCD_CA_CERT, 0o644, self.ca_pem(CaKind::Etcd)));
        p.files.push(unit_file("etcd.service", &ectx)?);
        p.units.insert(0, unit("etcd.service", true, true));
        Ok(())
    }

    /// A master: the control plane, haproxy and keepalived for the VIP, the CA keys and the
    /// components' kubeconfigs.
    fn master_part(
        &self,
        node: &NodeIdentity,
        etcd_member: bool,
        ctx: &minijinja::Value,
        p: &mut Parts,
    ) -> Result<(), ApiError> {
        let c = &self.cluster;
        let node_ip = node
            .ip
            .map(|ip| ip.to_string())
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, format!("master {} has no address", node.name)))?;
        let local = format!("https://{node_ip}:6443");
        let etcd_servers: Vec<String> = c.etcd_members().map(|m| format!("https://{}:2379", m.ip())).collect();
        let masters: Vec<Value> = c.masters().map(|m| json!({"name": m.name, "ip": m.ip().to_string()})).collect();
        let position = c.masters().position(|m| m.name == node.name).unwrap_or(0);
        let peers: Vec<Value> = masters.iter().filter(|m| m["name"] != node.name.as_str()).cloned().collect();
        let mctx = minijinja::context! {
            etcd_servers => etcd_servers.join(","),
            masters => masters,
            peers => peers,
            priority => 150 - 10 * position as i64,
            router_id => u64::from(crate::digest::sha256_hex(c.name.as_bytes()).as_bytes()[0]) % 254 + 1,
            prefix => c.node(&node.name).map_or(24, |n| n.address.prefix_len()),
            ..ctx.clone()
        };
        if !etcd_member {
            p.files.push(file(paths::ETCD_CA_CERT, 0o644, self.ca_pem(CaKind::Etcd)));
        }
        p.files.push(file(paths::FRONT_PROXY_CA_CERT, 0o644, self.ca_pem(CaKind::FrontProxy)));
        for s in &self.master_secrets {
            p.files.push(file(s.node_path, 0o600, &s.contents));
        }
        p.files.push(unit_file("kube-apiserver.service", &mctx)?);
        p.files.push(unit_file("kube-controller-manager.service", &mctx)?);
        p.files.push(unit_file("kube-scheduler.service", &mctx)?);
        p.files.push(rendered(paths::SCHEDULER_CONFIG, "node/kube-scheduler.yaml", &mctx)?);
        p.files.push(rendered(paths::HAPROXY_CONFIG, "node/haproxy.cfg", &mctx)?);
        let mut keepalived = rendered(paths::KEEPALIVED_CONFIG, "node/keepalived.conf", &mctx)?;
        keepalived.expand = true;
        p.files.push(keepalived);
        for (path, user, purpose, server) in [
            (
                paths::CONTROLLER_MANAGER_KUBECONFIG,
                "system:kube-controller-manager",
                CertPurpose::ControllerManager,
                &local,
            ),
            (paths::SCHEDULER_KUBECONFIG, "system:kube-scheduler", CertPurpose::Scheduler, &local),
            (paths::ADMIN_KUBECONFIG, "kubernetes-admin", CertPurpose::Admin, &c.api.url()),
        ] {
            p.files.push(file(path, 0o600, self.kubeconfig(server, user, purpose)));
        }
        // haproxy binds the VIP on every master, also where keepalived has not put it.
        p.sysctls.insert("net.ipv4.ip_nonlocal_bind".into(), "1".into());
        p.units.extend([
            unit("kube-apiserver.service", true, true),
            unit("kube-controller-manager.service", true, true),
            unit("kube-scheduler.service", true, true),
            unit("haproxy.service", true, true),
            unit("keepalived.service", true, true),
        ]);
        Ok(())
    }

    /// How a node with a kubelet joins: TLS bootstrap through the VIP; masters first wait for
    /// their control plane and label themselves.
    fn join_spec(&self, node: &NodeIdentity, inputs: &NodeInputs) -> JoinSpec {
        let c = &self.cluster;
        let vip_url = c.api.url();
        let master = node.role == Role::Master;
        JoinSpec {
            api_server: vip_url.clone(),
            node_name: node.name.clone(),
            token: inputs.join_token.clone(),
            ca_pin: inputs.ca_pin,
            discovery: node.role == Role::Worker,
            kubelet_unit: "kubelet.service".into(),
            bootstrap_kubeconfig: kube::kubeconfig(
                &c.name,
                &vip_url,
                kube::CaRef::File(paths::CA_CERT),
                "kubelet-bootstrap",
                kube::Auth::Token(&inputs.join_token.expose()),
            ),
            node_labels: if master {
                BTreeMap::from([
                    ("node-role.kubernetes.io/master".into(), String::new()),
                    ("node-role.kubernetes.io/control-plane".into(), String::new()),
                ])
            } else {
                BTreeMap::new()
            },
            node_taints: Vec::new(),
            control_plane: master.then(|| {
                let (etcd_cert, etcd_key) = paths::cert_paths(CertPurpose::EtcdHealthcheckClient);
                let (admin_cert, admin_key) = paths::cert_paths(CertPurpose::Admin);
                ControlPlaneCheck {
                    etcd_url: "https://127.0.0.1:2379".into(),
                    etcd_ca: paths::ETCD_CA_CERT.into(),
                    etcd_cert: etcd_cert.into(),
                    etcd_key: etcd_key.into(),
                    apiserver_url: format!("https://{}:6443", node.ip.map(|ip| ip.to_string()).unwrap_or_default()),
                    ca: paths::CA_CERT.into(),
                    admin_cert: admin_cert.into(),
                    admin_key: admin_key.into(),
                }
            }),
        }
    }
}

/// Configuration fields as YAML lines to append to a configuration file (empty for none); the
/// manifest's checks keep them apart from the fields the template sets.
fn yaml_fields(fields: &serde_json::Map<String, Value>) -> String {
    if fields.is_empty() {
        return String::new();
    }
    #[expect(clippy::expect_used, reason = "YAML can write every JSON value")]
    serde_saphyr::to_string(&Value::Object(fields.clone())).expect("JSON values serialize as YAML")
}

/// The CoreDNS image an image carries (a component `…/coredns:TAG`), by reference.
fn coredns_image(image: &ImageInfo) -> Option<&str> {
    image.components.keys().map(String::as_str).find(|name| {
        crate::image::definition::split_reference(name)
            .is_some_and(|(repo, _)| repo == "coredns" || repo.ends_with("/coredns"))
    })
}

/// A BIRD protocol name for a node (letters, digits and `_`; node names have `-` and `.`).
fn bird_name(node: &str) -> String {
    node.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// What a node's config is assembled from, part by part.
struct Parts {
    files: Vec<FileSpec>,
    units: Vec<UnitSpec>,
    sysctls: BTreeMap<String, String>,
    modules: Vec<String>,
}

/// What a node's config depends on besides the cluster and the node record.
pub struct NodeInputs {
    /// The Kubernetes version the node runs.
    pub version: KubeVersion,
    /// The image carries containerd 2 (its config format differs).
    pub containerd2: bool,
    /// The bootstrap token for kubelet TLS bootstrap.
    pub join_token: proto::BootstrapToken,
    /// The cluster CA's pin, for discovery.
    pub ca_pin: proto::pin::CaPin,
    /// The sandbox image the node's image carries ([`proto::wire::ImageInfo::sandbox_image`]);
    /// none: [`DEFAULT_SANDBOX_IMAGE`].
    pub sandbox_image: Option<String>,
}
