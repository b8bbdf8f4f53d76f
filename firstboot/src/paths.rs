//! On-node paths, defined once for the image bake (`imgbuild`), the config the server renders, and
//! firstboot itself.
//!
//! Every path is absolute on the node; code that acts on a tree other than `/` (tests, image
//! bakes) joins it onto that tree's root with [`under`].

use std::path::{Path, PathBuf};

/// The first-boot payload, where Ignition's `storage.files` or cloud-init's `write_files` put it.
pub const BOOT_CONFIG: &str = "/etc/firstboot/config.json";
/// firstboot's own state: phase record, enrollment key and certificate.
pub const STATE_DIR: &str = "/var/lib/firstboot";
/// The phase record (JSON), rewritten atomically after every phase.
pub const STATE_FILE: &str = "/var/lib/firstboot/state.json";
/// Written by the image bake: the image's name, role and component versions.
pub const IMAGE_INFO: &str = "/usr/lib/imgbuild/image.json";
/// firstboot's systemd unit.
pub const UNIT: &str = "firstboot.service";
/// The firstboot binary inside images: a link into its own read-only layer.
pub const BINARY: &str = "/usr/bin/firstboot";
/// Where the initramfs mounts an image's firstboot layer (an erofs holding only the binary, kept
/// apart from the root so that a new firstboot does not make a new root file system).
pub const LAYER: &str = "/usr/lib/firstboot";
/// Kubernetes configuration, kubeadm's layout.
pub const KUBERNETES_DIR: &str = "/etc/kubernetes";
pub const PKI_DIR: &str = "/etc/kubernetes/pki";
pub const ETCD_PKI_DIR: &str = "/etc/kubernetes/pki/etcd";
/// Units and drop-ins delivered by the role config.
pub const SYSTEMD_DIR: &str = "/etc/systemd/system";
/// The kubelet's rotated client certificate (written by the kubelet after TLS bootstrap).
pub const KUBELET_CLIENT_CERT: &str = "/var/lib/kubelet/pki/kubelet-client-current.pem";
pub const KUBELET_KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
/// DMI identity sources.
pub const DMI_PRODUCT_UUID: &str = "/sys/class/dmi/id/product_uuid";
pub const DMI_PRODUCT_SERIAL: &str = "/sys/class/dmi/id/product_serial";
pub const NET_CLASS: &str = "/sys/class/net";
pub const KERNEL_CMDLINE: &str = "/proc/cmdline";

/// `path` (absolute on the node) inside the tree at `root`.
pub fn under(root: &Path, path: impl AsRef<Path>) -> PathBuf {
    let p = path.as_ref();
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Where a node keeps the certificate and key of each purpose (kubeadm's file names).
pub fn cert_paths(purpose: crate::proto::CertPurpose) -> (&'static str, &'static str) {
    use crate::proto::CertPurpose as P;
    match purpose {
        P::Apiserver => ("/etc/kubernetes/pki/apiserver.crt", "/etc/kubernetes/pki/apiserver.key"),
        P::ApiserverKubeletClient => {
            ("/etc/kubernetes/pki/apiserver-kubelet-client.crt", "/etc/kubernetes/pki/apiserver-kubelet-client.key")
        }
        P::ApiserverEtcdClient => {
            ("/etc/kubernetes/pki/apiserver-etcd-client.crt", "/etc/kubernetes/pki/apiserver-etcd-client.key")
        }
        P::FrontProxyClient => {
            ("/etc/kubernetes/pki/front-proxy-client.crt", "/etc/kubernetes/pki/front-proxy-client.key")
        }
        P::EtcdServer => ("/etc/kubernetes/pki/etcd/server.crt", "/etc/kubernetes/pki/etcd/server.key"),
        P::EtcdPeer => ("/etc/kubernetes/pki/etcd/peer.crt", "/etc/kubernetes/pki/etcd/peer.key"),
        P::EtcdHealthcheckClient => {
            ("/etc/kubernetes/pki/etcd/healthcheck-client.crt", "/etc/kubernetes/pki/etcd/healthcheck-client.key")
        }
        P::ControllerManager => {
            ("/etc/kubernetes/pki/controller-manager.crt", "/etc/kubernetes/pki/controller-manager.key")
        }
        P::Scheduler => ("/etc/kubernetes/pki/scheduler.crt", "/etc/kubernetes/pki/scheduler.key"),
        P::Admin => ("/etc/kubernetes/pki/admin.crt", "/etc/kubernetes/pki/admin.key"),
        P::KubeletServing => ("/var/lib/kubelet/pki/kubelet.crt", "/var/lib/kubelet/pki/kubelet.key"),
        P::KubeProxy => ("/etc/kubernetes/pki/kube-proxy.crt", "/etc/kubernetes/pki/kube-proxy.key"),
    }
}
