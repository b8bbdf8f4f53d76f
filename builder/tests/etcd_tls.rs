//! Proof with real parts: three Debian etcd members on loopback form a cluster with peer and
//! client TLS from our PKI and client-certificate auth on.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use firstboot::proto::CertPurpose;
use imgbuild::cluster::{Cluster, DEFAULT_MANIFEST};
use imgbuild::pki::{CaKind, NodeIdentity, leaf_spec};
use imgbuild::state::{self, State};
use support::*;

#[test]
fn three_etcd_members_form_a_tls_cluster_with_our_certificates() {
    let etcd = require_tool("etcd", "etcd-server");
    let etcdctl = require_tool("etcdctl", "etcd-client");
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap();
    let st = State::new(dir.path().join("state"));
    state::init(&st, &cluster, &[]).unwrap();
    let ca = st.ca(CaKind::Etcd).unwrap();
    let ca_file = st.pki_dir().join(CaKind::Etcd.cert_file());
    let year = Duration::from_secs(365 * 86400);

    let members: Vec<_> = cluster.etcd_members().collect();
    assert_eq!(members.len(), 3);
    let ports: Vec<(u16, u16)> = members.iter().map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> =
        members.iter().zip(&ports).map(|(m, (_, peer))| format!("{}=https://127.0.0.1:{peer}", m.name)).collect();
    let mut guards = Vec::new();
    for (m, (client, peer)) in members.iter().zip(&ports) {
        let node = NodeIdentity { name: m.name.clone(), role: m.role, ip: Some(m.ip()) };
        let mdir = dir.path().join(&m.name);
        std::fs::create_dir_all(&mdir).unwrap();
        for (purpose, stem) in [(CertPurpose::EtcdServer, "server"), (CertPurpose::EtcdPeer, "peer")] {
            let spec = leaf_spec(purpose, &cluster, &node).unwrap();
            let (cert, key) = ca.issue_with_new_key(&spec, cluster.pki.key_algorithm, year).unwrap();
            std::fs::write(mdir.join(format!("{stem}.crt")), cert).unwrap();
            std::fs::write(mdir.join(format!("{stem}.key")), key).unwrap();
        }
        let f = |n: &str| mdir.join(n).display().to_string();
        let log = std::fs::File::create(mdir.join("etcd.log")).unwrap();
        let child = Command::new(&etcd)
            .args(["--name", &m.name, "--data-dir", &f("data"), "--logger=zap", "--log-outputs=stderr"])
            .args(["--listen-client-urls", &format!("https://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("https://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("https://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("https://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "imgbuild-test", "--client-cert-auth", "--peer-client-cert-auth"])
            .args([
                "--trusted-ca-file",
                &ca_file.display().to_string(),
                "--cert-file",
                &f("server.crt"),
                "--key-file",
                &f("server.key"),
            ])
            .args([
                "--peer-trusted-ca-file",
                &ca_file.display().to_string(),
                "--peer-cert-file",
                &f("peer.crt"),
                "--peer-key-file",
                &f("peer.key"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        guards.push(ChildGuard(child, m.name.clone()));
    }

    // The healthcheck client certificate, as a master holds it.
    let master = &members[0];
    let node = NodeIdentity { name: master.name.clone(), role: master.role, ip: Some(master.ip()) };
    let spec = leaf_spec(CertPurpose::EtcdHealthcheckClient, &cluster, &node).unwrap();
    let (cert, key) = ca.issue_with_new_key(&spec, cluster.pki.key_algorithm, year).unwrap();
    std::fs::write(dir.path().join("client.crt"), cert).unwrap();
    std::fs::write(dir.path().join("client.key"), key).unwrap();
    let endpoints: Vec<String> = ports.iter().map(|(c, _)| format!("https://127.0.0.1:{c}")).collect();
    let ctl = |with_cert: bool, args: &[&str]| {
        let mut c = Command::new(&etcdctl);
        c.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &endpoints.join(","),
            "--cacert",
            &ca_file.display().to_string(),
            "--command-timeout=5s",
        ]);
        if with_cert {
            c.args(["--cert", &dir.path().join("client.crt").display().to_string()]);
            c.args(["--key", &dir.path().join("client.key").display().to_string()]);
        }
        c.args(args).output().unwrap()
    };
    let logs = || {
        members
            .iter()
            .map(|m| {
                format!(
                    "--- {}\n{}",
                    m.name,
                    std::fs::read_to_string(dir.path().join(&m.name).join("etcd.log")).unwrap_or_default()
                )
            })
            .collect::<String>()
    };

    let health = wait_for("3 healthy etcd members", Duration::from_secs(60), || {
        let out = ctl(true, &["endpoint", "health"]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (text.matches("is healthy").count() == 3).then_some(text)
    });
    assert!(!health.contains("unhealthy"), "{health}");

    let list = ctl(true, &["member", "list", "-w", "json"]);
    assert!(list.status.success(), "member list: {}\n{}", String::from_utf8_lossy(&list.stderr), logs());
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let mut names: Vec<&str> = v["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["k8s-master1", "k8s-master2", "k8s-master3"]);

    let put = ctl(true, &["put", "/imgbuild/test", "hello"]);
    assert!(put.status.success(), "put: {}", String::from_utf8_lossy(&put.stderr));
    let get = ctl(true, &["get", "/imgbuild/test", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello");

    // Client-cert auth is really on: without a certificate the cluster refuses.
    let anonymous = ctl(false, &["get", "/imgbuild/test"]);
    assert!(!anonymous.status.success(), "etcd answered a client without a certificate");
}
