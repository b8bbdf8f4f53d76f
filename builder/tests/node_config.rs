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
    let (index, node) = cluster.nodes.iter().enumerate().find(|(_, n)| n.name == name).unwrap();
    let ident = NodeIdentity { name: node.name.clone(), role: node.role, ip: Some(node.ip()) };
    let inputs = NodeInputs {
        version: version.parse().unwrap(),
        containerd2,
        join_token: "abcdef.0123456789abcdef".parse().unwrap(),
        ca_pin: format!("sha256:{}", "5e".repeat(32)).parse().unwrap(),
        // What images/debian-12.toml's images carry; newer versions render the default.
        sandbox_image: version.starts_with("v1.20.").then(|| "imgbuild.local/pause:3.4-v1.20.2".to_string()),
    };
    r.render(&ident, index, &inputs).unwrap()
}

/// Everything in a node config but key and certificate material (which differs per state), in
/// one reviewable text.
fn describe(c: &NodeConfig) -> String {
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
                f.contents
            );
        }
    }
    s
}

/// The server's renderer for the reference cluster, with a fresh state dir.
fn reference() -> (tempfile::TempDir, Cluster, Renderer) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap();
    let st = State::new(dir.path().join("state"));
    state::init(&st, &cluster, &[]).unwrap();
    let r = Renderer::new(&st, &cluster).unwrap();
    (dir, cluster, r)
}

#[test]
fn golden_node_configs_for_production_and_testbed_versions() {
    let (_dir, cluster, r) = reference();
    for (version, containerd2) in [("v1.20.2", false), ("v1.34.7", true)] {
        for name in ["k8s-master1", "k8s-worker1"] {
            let c = render(&r, &cluster, name, version, containerd2);
            golden(&format!("node/{version}/{name}.txt"), &describe(&c));
        }
    }
}

#[test]
fn workers_get_no_keys_and_masters_see_the_whole_control_plane() {
    let (_dir, cluster, r) = reference();

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
