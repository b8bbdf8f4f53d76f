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
/// Written by the image bake: the OCI archives the image carries, one per line as `ARCHIVE
/// REPOSITORY TAG DIGEST`, imported into containerd by `imgbuild-images.service`.
pub const IMAGE_LIST: &str = "/usr/lib/imgbuild/images/list";
/// The OCI archives themselves (`<repository's last part>-<tag>.oci.tar`).
pub const IMAGE_ARCHIVES: &str = "/usr/lib/imgbuild/images";
/// firstboot's systemd unit.
pub const UNIT: &str = "firstboot.service";
/// The firstboot binary inside images: a link into its own read-only layer.
pub const BINARY: &str = "/usr/bin/firstboot";
/// Where the initramfs mounts an image's firstboot layer (an erofs holding only the binary, kept
/// apart from the root so that a new firstboot does not make a new root file system).
pub const LAYER: &str = "/usr/lib/firstboot";
/// Kubernetes configuration, kubeadm's layout.
pub const KUBERNETES_DIR: &str = "/etc/kubernetes";
/// The cluster PKI directory: cluster and front-proxy CAs, the service-account keys, leaf certificates.
pub const PKI_DIR: &str = "/etc/kubernetes/pki";
/// The etcd PKI directory: the etcd CA and etcd's leaf certificates.
pub const ETCD_PKI_DIR: &str = "/etc/kubernetes/pki/etcd";
/// The CAs every node trusts, and the keys masters hold (kubeadm's file names).
pub const CA_CERT: &str = "/etc/kubernetes/pki/ca.crt";
/// The cluster CA key (masters only).
pub const CA_KEY: &str = "/etc/kubernetes/pki/ca.key";
/// The etcd CA certificate.
pub const ETCD_CA_CERT: &str = "/etc/kubernetes/pki/etcd/ca.crt";
/// The etcd CA key (masters only).
pub const ETCD_CA_KEY: &str = "/etc/kubernetes/pki/etcd/ca.key";
/// The front-proxy (aggregation layer) CA certificate.
pub const FRONT_PROXY_CA_CERT: &str = "/etc/kubernetes/pki/front-proxy-ca.crt";
/// The front-proxy CA key (masters only).
pub const FRONT_PROXY_CA_KEY: &str = "/etc/kubernetes/pki/front-proxy-ca.key";
/// The service-account signing key pair (masters).
pub const SA_KEY: &str = "/etc/kubernetes/pki/sa.key";
/// The service-account public key, which the apiserver verifies tokens with.
pub const SA_PUB: &str = "/etc/kubernetes/pki/sa.pub";
/// Kubeconfigs of the components and the operator on a master (kubeadm's names).
pub const ADMIN_KUBECONFIG: &str = "/etc/kubernetes/admin.conf";
/// kube-controller-manager's kubeconfig.
pub const CONTROLLER_MANAGER_KUBECONFIG: &str = "/etc/kubernetes/controller-manager.conf";
/// kube-scheduler's kubeconfig.
pub const SCHEDULER_KUBECONFIG: &str = "/etc/kubernetes/scheduler.conf";
/// kube-scheduler's configuration file (`KubeSchedulerConfiguration`).
pub const SCHEDULER_CONFIG: &str = "/etc/kubernetes/kube-scheduler.yaml";
/// kube-proxy's kubeconfig.
pub const KUBE_PROXY_KUBECONFIG: &str = "/etc/kubernetes/kube-proxy.conf";
/// kube-proxy's configuration for a proxy mode (`ipvs`, `iptables`).
pub fn kube_proxy_config(mode: &str) -> String {
    format!("/var/lib/kube-proxy/config-{mode}.yaml")
}
/// The kubelet's configuration file (`KubeletConfiguration`).
pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";
/// containerd's configuration.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// The CNI network configuration the kubelet's pods get, as a template: containerd writes it into
/// its CNI directory with the node's pod range once the controller-manager assigned one
/// (`Node.spec.podCIDR`, passed on by the kubelet).
pub const CNI_TEMPLATE: &str = "/etc/containerd/cni.conflist.tmpl";
/// BIRD's configuration: the node's pod range announced to the masters, the others' learned.
pub const BIRD_CONFIG: &str = "/etc/bird/bird.conf";
/// haproxy's configuration (masters: balances the API over every master).
pub const HAPROXY_CONFIG: &str = "/etc/haproxy/haproxy.cfg";
/// keepalived's configuration (masters: holds the API VIP).
pub const KEEPALIVED_CONFIG: &str = "/etc/keepalived/keepalived.conf";
/// The kernel parameters of [`crate::wire::HostSetup::sysctls`], applied again on every boot.
pub const SYSCTL_CONFIG: &str = "/etc/sysctl.d/90-kubernetes.conf";
/// The kernel modules of [`crate::wire::HostSetup::modules`], loaded again on every boot.
pub const MODULES_CONFIG: &str = "/etc/modules-load.d/kubernetes.conf";
/// The static address from a per-node payload (systemd-networkd).
pub const STATIC_NETWORK: &str = "/etc/systemd/network/10-firstboot.network";
/// systemd-resolved's settings from the payload (`spec.hosts` DNS servers and search domains).
pub const RESOLVED_DROPIN: &str = "/etc/systemd/resolved.conf.d/50-imgbuild.conf";
/// systemd-timesyncd's settings from the payload (`spec.hosts` NTP servers).
pub const TIMESYNCD_DROPIN: &str = "/etc/systemd/timesyncd.conf.d/50-imgbuild.conf";
/// root's SSH keys from the payload (operators' break-glass access).
pub const ROOT_AUTHORIZED_KEYS: &str = "/root/.ssh/authorized_keys";
/// The node's hostname.
pub const HOSTNAME: &str = "/etc/hostname";
/// Units and drop-ins delivered by the role config.
pub const SYSTEMD_DIR: &str = "/etc/systemd/system";
/// The kubelet's rotated client certificate (written by the kubelet after TLS bootstrap).
pub const KUBELET_CLIENT_CERT: &str = "/var/lib/kubelet/pki/kubelet-client-current.pem";
/// The kubelet's kubeconfig, written by the kubelet once TLS bootstrap is done.
pub const KUBELET_KUBECONFIG: &str = "/etc/kubernetes/kubelet.conf";
/// The kubelet's bootstrap kubeconfig (bootstrap token), from [`crate::wire::JoinSpec`].
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
/// DMI identity sources.
pub const DMI_PRODUCT_UUID: &str = "/sys/class/dmi/id/product_uuid";
/// The SMBIOS system serial number.
pub const DMI_PRODUCT_SERIAL: &str = "/sys/class/dmi/id/product_serial";
/// One entry per network interface, with its MAC in `address`.
pub const NET_CLASS: &str = "/sys/class/net";
/// The kernel command line, where PXE passes the payload.
pub const KERNEL_CMDLINE: &str = "/proc/cmdline";

/// `path` (absolute on the node) inside the tree at `root`.
pub fn under(root: &Path, path: impl AsRef<Path>) -> PathBuf {
    let p = path.as_ref();
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Where a node keeps the certificate and key of each purpose (kubeadm's file names).
pub fn cert_paths(purpose: crate::wire::CertPurpose) -> (&'static str, &'static str) {
    use crate::wire::CertPurpose as P;
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
