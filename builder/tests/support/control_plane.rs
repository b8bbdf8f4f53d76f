//! A real Kubernetes control plane on 127.0.0.1 for the integration tests: etcd (the Debian
//! package the master image carries), kube-apiserver and kube-controller-manager v1.20.2 (built
//! by `images/local/build-kubernetes`), every certificate issued by the cluster's own CAs from an
//! `imgbuild init` state dir, every port free and on loopback. Stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use imgbuild::cluster::Cluster;
use imgbuild::kube;
use imgbuild::pki::{CaKind, NodeIdentity, leaf_spec};
use imgbuild::state::State;
use proto::wire::CertPurpose;

use super::{ChildGuard, EtcdCluster, free_port, wait_for};

/// Where `images/local/build-kubernetes` (run by `.ci/setup-host`) puts the binaries.
pub fn kubernetes_bin() -> PathBuf {
    let bin = super::cache_dir().join("k8s/v1.20.2/bin");
    assert!(
        bin.join("kube-apiserver").is_file(),
        "no Kubernetes v1.20.2 binaries in {}: run .ci/setup-host (images/local/build-kubernetes)",
        bin.display()
    );
    bin
}

pub struct ControlPlane {
    /// Stopped in reverse order: controller-manager, apiserver, then etcd.
    guards: Vec<ChildGuard>,
    _etcd: EtcdCluster,
    pub dir: PathBuf,
    pub api_url: String,
    pub kubeconfig: PathBuf,
    bin: PathBuf,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager for `cluster`'s first master,
    /// with `st`'s CAs, service-account keys and a bootstrap-token authenticator, and waits
    /// until the apiserver is ready.
    pub fn start(dir: &Path, st: &State, cluster: &Cluster) -> ControlPlane {
        let bin = kubernetes_bin();
        std::fs::create_dir_all(dir).unwrap();
        let etcd = EtcdCluster::start(&dir.join("etcd"), st, cluster, 1);
        let master = cluster.masters().next().expect("a master");
        let node = NodeIdentity { name: master.name.clone(), role: master.role, ip: Some(master.ip()) };
        let year = Duration::from_secs(365 * 86400);
        let pki = st.pki_dir();
        let issue = |purpose: CertPurpose, stem: &str| -> (String, String) {
            let spec = leaf_spec(purpose, cluster, &node).unwrap();
            let ca = st.ca(spec.ca).unwrap();
            let (cert, key) = ca.issue_with_new_key(&spec, cluster.pki.key_algorithm, year).unwrap();
            let (c, k) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            (c.display().to_string(), k.display().to_string())
        };
        let (serving, serving_key) = issue(CertPurpose::Apiserver, "apiserver");
        let (etcd_client, etcd_client_key) = issue(CertPurpose::ApiserverEtcdClient, "apiserver-etcd-client");
        let (kubelet_client, kubelet_client_key) = issue(CertPurpose::ApiserverKubeletClient, "kubelet-client");
        let (front_proxy, front_proxy_key) = issue(CertPurpose::FrontProxyClient, "front-proxy-client");
        let (kcm, kcm_key) = issue(CertPurpose::ControllerManager, "controller-manager");
        let (admin, admin_key) = issue(CertPurpose::Admin, "admin");
        let p = |rel: &str| pki.join(rel).display().to_string();
        let ca = p(CaKind::Cluster.cert_file());

        let port = free_port();
        let api_url = format!("https://127.0.0.1:{port}");
        let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--insecure-port=0"])
            .arg(format!("--secure-port={port}"))
            // Bound to loopback, the apiserver cannot put 127.0.0.1 into the `kubernetes`
            // Endpoints (it refuses loopback addresses there): no reconciler.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--etcd-servers={}", etcd.endpoints.join(",")))
            .arg(format!("--etcd-cafile={}", etcd.ca.display()))
            .args([format!("--etcd-certfile={etcd_client}"), format!("--etcd-keyfile={etcd_client_key}")])
            .args([format!("--tls-cert-file={serving}"), format!("--tls-private-key-file={serving_key}")])
            .arg(format!("--client-ca-file={ca}"))
            .args([
                format!("--kubelet-client-certificate={kubelet_client}"),
                format!("--kubelet-client-key={kubelet_client_key}"),
            ])
            .args([
                format!("--requestheader-client-ca-file={}", p(CaKind::FrontProxy.cert_file())),
                format!("--proxy-client-cert-file={front_proxy}"),
                format!("--proxy-client-key-file={front_proxy_key}"),
                "--requestheader-allowed-names=front-proxy-client".into(),
            ])
            .args([
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
            ])
            .arg(format!("--service-cluster-ip-range={}", cluster.networks.service_cidr))
            .args(["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction"])
            .arg("--enable-bootstrap-token-auth=true")
            .stdout(Stdio::null())
            .stderr(log("kube-apiserver"))
            .spawn()
            .expect("start kube-apiserver");
        let guards = vec![ChildGuard(apiserver, "kube-apiserver".into())];

        let write_kubeconfig = |name: &str, user: &str, cert: &str, key: &str| -> PathBuf {
            let text = kube::kubeconfig(
                &cluster.name,
                &api_url,
                kube::CaRef::File(&ca),
                user,
                kube::Auth::CertFiles { cert, key },
            );
            let f = dir.join(name);
            std::fs::write(&f, text).unwrap();
            f
        };
        let kubeconfig = write_kubeconfig("admin.conf", "kubernetes-admin", &admin, &admin_key);
        let kcm_conf = write_kubeconfig("controller-manager.conf", "system:kube-controller-manager", &kcm, &kcm_key);
        let mut plane =
            ControlPlane { guards, _etcd: etcd, dir: dir.to_path_buf(), api_url: api_url.clone(), kubeconfig, bin };
        plane.wait_ready("kube-apiserver", &format!("{api_url}/readyz"));

        let kcm_port = free_port();
        let controller_manager = Command::new(plane.bin.join("kube-controller-manager"))
            .args(["--bind-address=127.0.0.1", "--port=0", "--leader-elect=false"])
            .arg(format!("--secure-port={kcm_port}"))
            .arg(format!("--kubeconfig={}", kcm_conf.display()))
            .arg(format!("--authentication-kubeconfig={}", kcm_conf.display()))
            .arg(format!("--authorization-kubeconfig={}", kcm_conf.display()))
            // Signs kubelet certificates with the cluster CA; the bootstrap signer signs
            // cluster-info for every bootstrap token.
            .args([format!("--cluster-signing-cert-file={ca}"), format!("--cluster-signing-key-file={}", p("ca.key"))])
            .arg(format!("--root-ca-file={ca}"))
            .arg(format!("--service-account-private-key-file={}", p("sa.key")))
            .args(["--use-service-account-credentials=true", "--controllers=*,bootstrapsigner,tokencleaner"])
            .stdout(Stdio::null())
            .stderr(log("kube-controller-manager"))
            .spawn()
            .expect("start kube-controller-manager");
        plane.guards.push(ChildGuard(controller_manager, "kube-controller-manager".into()));
        plane.wait_ready("kube-controller-manager", &format!("https://127.0.0.1:{kcm_port}/healthz"));
        plane
    }

    /// Waits for an HTTPS health endpoint to answer 200, or panics with the component's log.
    fn wait_ready(&mut self, name: &str, url: &str) {
        let log = self.dir.join(format!("{name}.log"));
        wait_for(&format!("{name} at {url}"), Duration::from_secs(120), || {
            for g in &mut self.guards {
                if let Ok(Some(status)) = g.0.try_wait() {
                    panic!("{} exited ({status}):\n{}", g.1, tail(&log));
                }
            }
            let out = Command::new("curl").args(["-skf", "-o", "/dev/null", url]).status().ok()?;
            out.success().then_some(())
        });
    }

    /// The project's kubectl v1.20.2 with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("kubectl"))
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(g) = self.guards.pop() {
            drop(g);
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
