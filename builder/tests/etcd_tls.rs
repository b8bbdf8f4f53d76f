//! Proof with real parts: three Debian etcd members on loopback form a cluster with peer and
//! client TLS from our PKI and client-certificate auth on.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use imgbuild::cluster::{Cluster, DEFAULT_MANIFEST};
use imgbuild::state::{self, State};
use support::*;

#[test]
fn three_etcd_members_form_a_tls_cluster_with_our_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap();
    let st = State::new(dir.path().join("state"));
    state::init(&st, &cluster, &[]).unwrap();
    // start() waits until all three report healthy over TLS with a client certificate.
    let etcd = EtcdCluster::start(dir.path(), &st, &cluster, 3);

    let list = etcd.ctl(true, &["member", "list", "-w", "json"]);
    assert!(list.status.success(), "member list: {}\n{}", String::from_utf8_lossy(&list.stderr), etcd.logs());
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let mut names: Vec<&str> = v["members"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["k8s-master1", "k8s-master2", "k8s-master3"]);
    let health = etcd.ctl(true, &["endpoint", "health", "--cluster"]);
    let text = String::from_utf8_lossy(&health.stdout).to_string() + &String::from_utf8_lossy(&health.stderr);
    assert_eq!(text.matches("is healthy").count(), 3, "{text}");
    assert!(!text.contains("unhealthy"), "{text}");

    let put = etcd.ctl(true, &["put", "/imgbuild/test", "hello"]);
    assert!(put.status.success(), "put: {}", String::from_utf8_lossy(&put.stderr));
    let get = etcd.ctl(true, &["get", "/imgbuild/test", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello");

    // Client-cert auth is really on: without a certificate the cluster refuses.
    let anonymous = etcd.ctl(false, &["get", "/imgbuild/test"]);
    assert!(!anonymous.status.success(), "etcd answered a client without a certificate");
}
