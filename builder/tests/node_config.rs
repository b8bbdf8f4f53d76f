//! What the enrollment server renders for each node: golden files for the production Kubernetes
//! version and for the testbed's v1.20 (flags that differ between versions are chosen by
//! version), and the rules a reviewer would otherwise check by hand: workers get no key, etcd's
//! initial cluster lists every member, haproxy balances every master.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use imgbuild::cluster::{Cluster, DEFAULT_MANIFEST};
use imgbuild::pki::NodeIdentity;
use imgbuild::serve::render::{NodeInputs, Renderer};
use imgbuild::state::{self, State};
use proto::wire::NodeConfig;
use support::*;

fn render(r: &Renderer, cluster: &Cluster, name: &str, version: &str, containerd2: bool) -> NodeConfig {
    let node = cluster.nodes.iter().find(|n| n.name == name).unwrap();
    let ident = NodeIdentity { name: node.name.clone(), role: node.role, ip: Some(node.ip()) };
    let inputs = NodeInputs {
        version: version.parse().unwrap(),
        containerd2,
        join_token: "abcdef.0123456789abcdef".parse().unwrap(),
        ca_pin: format!("sha256:{}", "5e".repeat(32)).parse().unwrap(),
        // What images/debian-12.toml's images carry; newer versions render the default.
        sandbox_image: version.starts_with("v1.20.").then(|| "imgbuild.local/pause:3.4-v1.20.2".to_string()),
    };
    r.render(&ident, &inputs).unwrap()
}

/// Everything in a node config but key and certificate material and the BGP password (which
/// differ per state), in one reviewable text.
fn describe(c: &NodeConfig, bgp_password: &str) -> String {
    let mut s = format!("node {} ({}), Kubernetes {}\n", c.node.name, c.node.role, c.kubernetes_version);
    s += &format!("host: {}\n", serde_json::to_string(&c.host).unwrap());
    for u in &c.units {
        s += &format!("unit {}: enable={} start={} restart={}\n", u.name, u.enable, u.start, u.restart);
    }
    for cert in &c.certs {
        s += &format!("cert {}: {} {}\n", cert.purpose, cert.cert_path, cert.key_path);
    }
    if let Some(j) = &c.join {
        let mut j = j.clone();
        j.bootstrap_kubeconfig = String::new();
        s += &format!("join: {}\n", serde_json::to_string(&j).unwrap());
    }
    for f in &c.files {
        if f.contents.contains("-----BEGIN") {
            s += &format!("\n==> {} (mode {:o}): PEM, {} lines\n", f.path, f.mode, f.contents.lines().count());
        } else {
            s += &format!(
                "\n==> {} (mode {:o}{})\n{}",
                f.path,
                f.mode,
                if f.expand { ", expand" } else { "" },
                f.contents.replace(bgp_password, "<pki/bgp.password>")
            );
        }
    }
    s
}

/// The server's renderer for the reference cluster, with a fresh state dir, and the state's BGP
/// password.
fn reference() -> (tempfile::TempDir, Cluster, Renderer, String) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap();
    let st = State::new(dir.path().join("state"));
    state::init(&st, &cluster, &[]).unwrap();
    let r = Renderer::new(&st, &cluster).unwrap();
    let password = std::fs::read_to_string(st.bgp_password()).unwrap().trim().to_string();
    (dir, cluster, r, password)
}

#[test]
fn golden_node_configs_for_production_and_testbed_versions() {
    let (_dir, cluster, r, password) = reference();
    for (version, containerd2) in [("v1.20.2", false), ("v1.34.7", true)] {
        for name in ["k8s-master1", "k8s-worker1"] {
            let c = render(&r, &cluster, name, version, containerd2);
            golden(&format!("node/{version}/{name}.txt"), &describe(&c, &password));
        }
    }
}

#[test]
fn workers_get_no_keys_and_masters_see_the_whole_control_plane() {
    let (_dir, cluster, r, _) = reference();

    let w = render(&r, &cluster, "k8s-worker2", "v1.20.2", false);
    for f in &w.files {
        assert!(!f.contents.contains("PRIVATE KEY"), "worker receives a private key in {}", f.path);
    }
    assert!(w.units.iter().all(|u| !u.name.starts_with("etcd") && !u.name.starts_with("kube-apiserver")));
    let join = w.join.as_ref().unwrap();
    assert!(join.discovery && join.control_plane.is_none());
    assert_eq!(join.api_server, "https://192.168.3.110:6443");

    let m = render(&r, &cluster, "k8s-master2", "v1.20.2", false);
    let file = |name: &str| &m.files.iter().find(|f| f.path == name).unwrap().contents;
    assert!(file("/etc/systemd/system/etcd.service").contains(
        "--initial-cluster=k8s-master1=https://192.168.3.111:2380,k8s-master2=https://192.168.3.112:2380,\
         k8s-master3=https://192.168.3.113:2380"
    ));
    let haproxy = file("/etc/haproxy/haproxy.cfg");
    for ip in ["192.168.3.111", "192.168.3.112", "192.168.3.113"] {
        assert!(haproxy.contains(&format!("{ip}:6443 check")), "haproxy lacks {ip}");
    }
    let keepalived = file("/etc/keepalived/keepalived.conf");
    assert!(keepalived.contains("192.168.3.110/24 dev @@INTERFACE@@"));
    assert!(keepalived.contains("192.168.3.111") && keepalived.contains("192.168.3.113"));
    assert!(!keepalived.contains("unicast_peer {\n    192.168.3.112"), "a master is its own peer");
    // The first service IP and the VIP are what clients dial; CA keys only on masters.
    assert!(m.files.iter().any(|f| f.path == "/etc/kubernetes/pki/ca.key" && f.mode == 0o600));
    assert!(m.join.as_ref().unwrap().control_plane.is_some());
}

#[test]
fn pod_network_bgp_peers_with_the_masters_and_external_renders_none() {
    let (dir, cluster, r, password) = reference();
    let bird = |c: &NodeConfig| c.files.iter().find(|f| f.path == proto::paths::BIRD_CONFIG).cloned();

    // A worker peers with every master; a master reflects for the node network and peers with
    // the other masters, not itself.
    let w = render(&r, &cluster, "k8s-worker2", "v1.20.2", false);
    let wb = bird(&w).unwrap();
    assert_eq!((wb.mode, wb.owner.as_deref()), (0o640, Some("root:bird")), "the password file is not world-readable");
    assert!(wb.contents.contains(&format!("password \"{password}\";")));
    for ip in ["192.168.3.111", "192.168.3.112", "192.168.3.113"] {
        assert!(wb.contents.contains(&format!("neighbor {ip} as 64512;")), "worker does not peer with {ip}");
    }
    assert!(!wb.contents.contains("rr client") && wb.contents.contains("router id 192.168.3.122;"));
    assert!(w.units.iter().any(|u| u.name == "bird.service" && u.start));
    let m = render(&r, &cluster, "k8s-master2", "v1.20.2", false);
    let mb = bird(&m).unwrap().contents;
    assert!(mb.contains("neighbor range 192.168.3.0/24 as 64512;") && mb.contains("rr client;"));
    assert!(mb.contains("neighbor 192.168.3.111 as 64512;") && mb.contains("neighbor 192.168.3.113 as 64512;"));
    assert!(!mb.contains("neighbor 192.168.3.112 "), "a master peers with itself");
    assert!(mb.contains("net ~ [ 10.30.0.0/16{24,24} ]"));
    // The CNI config is a template containerd fills with Node.spec.podCIDR; the controller-manager
    // assigns the ranges.
    let file = |c: &NodeConfig, p: &str| c.files.iter().find(|f| f.path == p).map(|f| f.contents.clone());
    assert!(file(&w, proto::paths::CNI_TEMPLATE).unwrap().contains(r#""subnet": "{{.PodCIDR}}""#));
    assert!(
        file(&w, proto::paths::CONTAINERD_CONFIG)
            .unwrap()
            .contains("conf_template = \"/etc/containerd/cni.conflist.tmpl\"")
    );
    let cm = file(&m, "/etc/systemd/system/kube-controller-manager.service").unwrap();
    assert!(cm.contains("--allocate-node-cidrs=true") && cm.contains("--cluster-cidr=10.30.0.0/16"));

    // external: the operator's network add-on; nothing of ours but the range allocation.
    let yaml = DEFAULT_MANIFEST.replace("      mode: bgp\n      asn: 64512\n", "      mode: external\n");
    let external = Cluster::parse(&yaml, "cluster.yaml").unwrap();
    let st = State::new(dir.path().join("state"));
    let r = Renderer::new(&st, &external).unwrap();
    let w = render(&r, &external, "k8s-worker2", "v1.20.2", false);
    assert!(bird(&w).is_none() && file(&w, proto::paths::CNI_TEMPLATE).is_none());
    assert!(!w.units.iter().any(|u| u.name == "bird.service" || u.name == "imgbuild-pod-egress.service"));
    assert!(!file(&w, proto::paths::CONTAINERD_CONFIG).unwrap().contains("conf_template"));
}

#[test]
fn coredns_only_where_the_image_carries_it() {
    let (_dir, _cluster, r, _) = reference();
    let info = |components: &[&str]| proto::wire::ImageInfo {
        name: "x".into(),
        role: proto::Role::Master,
        kubernetes_version: "v1.34.7".into(),
        components: components.iter().map(|c| (c.to_string(), "v".to_string())).collect(),
        sandbox_image: None,
    };
    let kinds = |objects: &[serde_json::Value]| -> Vec<String> {
        objects
            .iter()
            .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
            .collect()
    };
    // Debian's images: no CoreDNS build, so no add-on (and no pod that could never start).
    let debian = r.cluster_objects(&[], Some(&info(&["kubelet", "imgbuild.local/pause:3.4-v1.20.2"])));
    assert!(!kinds(&debian).iter().any(|k| k.contains("coredns") || k.contains("kube-dns")), "{:?}", kinds(&debian));
    let prod = r.cluster_objects(&[], Some(&info(&["kubelet", "registry.k8s.io/coredns/coredns:v1.12.1"])));
    let k = kinds(&prod);
    for want in ["Deployment/coredns", "Service/kube-dns", "ConfigMap/coredns", "ClusterRole/system:coredns"] {
        assert!(k.iter().any(|x| x == want), "{want} missing from {k:?}");
    }
    let dep = prod.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], "registry.k8s.io/coredns/coredns:v1.12.1");
    assert!(pod["tolerations"].as_array().unwrap().iter().any(|t| t["key"] == "node-role.kubernetes.io/control-plane"));
    let svc = prod.iter().find(|o| o["kind"] == "Service").unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "10.40.0.10");
    let cm = prod.iter().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "coredns").unwrap();
    assert!(cm["data"]["Corefile"].as_str().unwrap().contains("kubernetes k8s.org in-addr.arpa ip6.arpa"));
}

/// A site's manifest: OIDC on the apiserver, kubelet and kube-proxy settings of its own.
const SITE: &str = "components:
    apiserver:
      extraArgs:
        oidc-issuer-url: https://sso.example.org/realms/k8s
        oidc-client-id: kubernetes
        oidc-username-claim: email
        oidc-username-prefix: \"oidc:%u\"
    controllerManager: {extraArgs: {node-monitor-grace-period: 20s}}
    scheduler: {extraArgs: {v: 2}}
    kubelet:
      extraArgs: {max-pods: 200}
      config: {serializeImagePulls: false, evictionHard: {memory.available: 200Mi}}
    kubeProxy:
      config: {conntrack: {maxPerCore: 65536}}";

#[test]
fn golden_site_components_reach_their_flags_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let (st, cluster) = state_with(dir.path(), |t| t.replacen("components: {}", SITE, 1));
    let r = Renderer::new(&st, &cluster).unwrap();
    let password = std::fs::read_to_string(st.bgp_password()).unwrap().trim().to_string();
    let m = render(&r, &cluster, "k8s-master1", "v1.20.2", false);
    golden("node/site/k8s-master1.txt", &describe(&m, &password));
    let file = |c: &NodeConfig, p: &str| c.files.iter().find(|f| f.path == p).unwrap().contents.clone();
    let api = file(&m, "/etc/systemd/system/kube-apiserver.service");
    assert!(api.contains("  \"--oidc-issuer-url=https://sso.example.org/realms/k8s\" \\\n"));
    // systemd would expand %u (the user) and $VAR: they reach the flag as written.
    assert!(api.contains("\"--oidc-username-prefix=oidc:%%u\""));
    assert!(api.trim_end().ends_with("WantedBy=multi-user.target"));
    let kubelet = file(&m, proto::paths::KUBELET_CONFIG);
    let parsed: serde_json::Value = serde_saphyr::from_str(&kubelet).unwrap();
    assert_eq!(parsed["serializeImagePulls"], false);
    assert_eq!(parsed["evictionHard"]["memory.available"], "200Mi");
    assert_eq!(parsed["clusterDNS"][0], "10.40.0.10", "imgbuild's fields are kept");
    let proxy: serde_json::Value = serde_saphyr::from_str(&file(&m, &proto::paths::kube_proxy_config("ipvs"))).unwrap();
    assert_eq!(proxy["conntrack"]["maxPerCore"], 65536);
    assert!(file(&m, "/etc/systemd/system/kubelet.service").contains("\"--max-pods=200\" \\\n  --v=1"));
}
