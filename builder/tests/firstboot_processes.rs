//! firstboot as a process: killed at every phase boundary and in the middle of every phase (after
//! the server acknowledged, before the node recorded), then run again; and several firstboot
//! processes in network namespaces of their own, each with its own address and MAC.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use proto::wire::NodeStatus;
use proto::wire::{CertPurpose, Phase, PhaseStatus};
use support::*;

fn run_firstboot(root: &Path, payload: &Path, crash: Option<String>, netns: Option<&str>) -> std::process::Output {
    let bin = workspace_bin("firstboot");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.args([
        "--root",
        root.to_str().unwrap(),
        "--config",
        payload.to_str().unwrap(),
        "--simulate",
        "--no-join",
        "--deadline",
        "60",
    ]);
    cmd.env_remove("FIRSTBOOT_CRASH");
    if let Some(c) = crash {
        cmd.env("FIRSTBOOT_CRASH", c);
    }
    cmd.output().unwrap()
}

/// What a node's tree holds: every file (but the test's own inputs and logs) with its mode.
fn tree(root: &Path) -> BTreeMap<String, u32> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, u32>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if ["sys", "etc/passwd", "etc/group", "payload.json", "var/lib/firstboot/effects.log"]
                .contains(&rel.as_str())
            {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(rel, meta.permissions().mode() & 0o7777);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Each certificate on disk certifies the key beside it.
fn keys_match_certs(root: &Path, purposes: &[CertPurpose]) {
    use rcgen::PublicKeyData;
    for p in purposes {
        let (cert, key) = proto::paths::cert_paths(*p);
        let pem = std::fs::read_to_string(proto::paths::under(root, cert)).unwrap();
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(proto::paths::under(root, key)).unwrap()).unwrap();
        let der: rustls_pki_types::CertificateDer =
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(x.public_key().raw, key.subject_public_key_info().as_slice(), "{p} on disk is not for its key");
    }
}

/// What must not differ between an interrupted and an uninterrupted run.
fn server_view(s: &NodeStatus) -> (Option<String>, Option<Phase>, Option<PhaseStatus>, usize, Vec<String>) {
    (s.node.clone(), s.phase, s.status, s.certificates, s.errors.clone())
}

struct Scenario {
    _dir: tempfile::TempDir,
    serve: ServeProcess,
    root: PathBuf,
    payload: PathBuf,
}

fn scenario(node: &str) -> Scenario {
    let dir = tempfile::tempdir().unwrap();
    let (st, cluster) = state_with(dir.path(), |t| t);
    let serve = ServeProcess::start(&st.root, "127.0.0.1:0", None);
    let n = cluster.node(node).unwrap();
    let root = node_root(&dir.path().join("node"), n.mac.as_ref().unwrap().as_str());
    let file = root.join("payload.json");
    std::fs::write(&file, serde_json::to_string(&node_payload(&st, &n.name, &serve.url)).unwrap()).unwrap();
    Scenario { _dir: dir, serve, root, payload: file }
}

#[test]
fn killed_at_every_phase_boundary_then_rerun_ends_identical() {
    let node = "k8s-master2";
    let purposes: Vec<CertPurpose> = CertPurpose::ALL.to_vec();
    let base = scenario(node);
    let out = run_firstboot(&base.root, &base.payload, None, None);
    assert!(out.status.success(), "uninterrupted run: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("firstboot: SUCCESS: k8s-master2"));
    let want_tree = tree(&base.root);
    let want_server: Vec<_> = base.serve.nodes().iter().map(server_view).collect();
    assert_eq!(want_server[0].1, Some(Phase::Done));
    assert_eq!(want_server[0].3, 12);
    keys_match_certs(&base.root, &purposes);

    for phase in &Phase::ALL[..Phase::ALL.len() - 1] {
        for when in ["unrecorded", "after"] {
            let crash = format!("{when}:{phase}");
            let s = scenario(node);
            let out = run_firstboot(&s.root, &s.payload, Some(crash.clone()), None);
            assert!(!out.status.success(), "{crash}: the crash hook did not fire");
            let out = run_firstboot(&s.root, &s.payload, None, None);
            assert!(out.status.success(), "{crash}: rerun failed: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(tree(&s.root), want_tree, "{crash}: files or modes differ from an uninterrupted run");
            keys_match_certs(&s.root, &purposes);
            let nodes = s.serve.nodes();
            assert_eq!(nodes.len(), 1, "{crash}: a duplicate node: {nodes:?}");
            assert_eq!(nodes.iter().map(server_view).collect::<Vec<_>>(), want_server, "{crash}");
            // One enrollment and one certificate per purpose, however often the node asked.
            let audit = std::fs::read_to_string(s.serve.state.join("audit.log")).unwrap();
            let count = |event: &str| audit.lines().filter(|l| l.contains(&format!("\"event\":\"{event}\""))).count();
            assert_eq!(count("enrolled"), 1, "{crash}");
            assert_eq!(count("re-enrolled"), 0, "{crash}");
            assert_eq!(count("signed"), purposes.len(), "{crash}: a second certificate for the same key");
        }
    }
}

/// Network namespaces made for this test, removed on drop.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn firstboot_processes_in_their_own_network_namespaces() {
    require_tool("ip", "iproute2");
    let dir = tempfile::tempdir().unwrap();
    let (st, cluster) = state_with(dir.path(), |t| t.replace("https://192.168.3.100:9443", "https://10.77.0.1:9443"));
    let tag = format!("ibt{}", std::process::id() % 100000);
    let srv = format!("{tag}-srv");
    let mut ns = Netns(vec![srv.clone()]);
    ip(&["netns", "add", &srv]);
    ip(&["-n", &srv, "link", "set", "lo", "up"]);
    ip(&["-n", &srv, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &srv, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
    ip(&["-n", &srv, "link", "set", "br0", "up"]);
    let mut nodes = Vec::new();
    for (i, n) in cluster.nodes.iter().enumerate() {
        let name = format!("{tag}-n{i}");
        ip(&["netns", "add", &name]);
        ns.0.push(name.clone());
        let host_side = format!("v{tag}{i}");
        ip(&["link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &name]);
        ip(&["link", "set", &host_side, "netns", &srv]);
        ip(&["-n", &srv, "link", "set", &host_side, "master", "br0", "up"]);
        ip(&["-n", &name, "link", "set", "eth0", "address", n.mac.as_ref().unwrap().as_str()]);
        let addr = format!("10.77.0.{}", 11 + i);
        ip(&["-n", &name, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        // The node's tree sees its namespace's NICs: `ip netns exec` mounts a sysfs for it.
        let root = dir.path().join(&n.name);
        std::fs::create_dir_all(root.join("sys/class")).unwrap();
        std::os::unix::fs::symlink("/sys/class/net", root.join("sys/class/net")).unwrap();
        image_accounts(&root);
        nodes.push((n.clone(), name, addr, root));
    }
    let serve = ServeProcess::start(&st.root, "10.77.0.1:9443", Some(&srv));
    let children: Vec<_> = nodes
        .iter()
        .map(|(n, netns, _, root)| {
            let file = root.join("payload.json");
            std::fs::write(&file, serde_json::to_string(&node_payload(&st, &n.name, &serve.url)).unwrap()).unwrap();
            let (root, netns) = (root.clone(), netns.clone());
            std::thread::spawn(move || run_firstboot(&root, &file, None, Some(&netns)))
        })
        .collect();
    for (child, (n, ..)) in children.into_iter().zip(&nodes) {
        let out = child.join().unwrap();
        assert!(out.status.success(), "{}: {}", n.name, String::from_utf8_lossy(&out.stderr));
    }
    // The server saw each machine from its own address; `imgbuild nodes` runs inside the
    // server's namespace like an operator on that network.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &srv,
            env!("CARGO_BIN_EXE_imgbuild"),
            "--state",
            st.root.to_str().unwrap(),
            "nodes",
            "--json",
            "--server",
            &serve.url,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Vec<NodeStatus> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.len(), cluster.nodes.len());
    assert!(
        status.iter().all(|s| s.phase == Some(Phase::Done) && s.status == Some(PhaseStatus::Succeeded)),
        "{status:?}"
    );
    let audit = std::fs::read_to_string(st.root.join("audit.log")).unwrap();
    for (n, _, addr, _) in &nodes {
        assert!(
            audit.lines().any(|l| l.contains("\"event\":\"enrolled\"")
                && l.contains(&format!("\"node\":\"{}\"", n.name))
                && l.contains(&format!("\"source\":\"{addr}\""))),
            "{} did not enroll from {addr}",
            n.name
        );
    }
    drop(serve);
}
