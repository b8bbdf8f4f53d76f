//! Proof against the real thing: a real control plane's bootstrap signer (kube-controller-manager
//! v1.20.2, with the cluster's own CAs) signs the `cluster-info` we render, and its signature is
//! byte for byte the one we compute; our CA pin equals openssl's.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use imgbuild::cluster::{Cluster, DEFAULT_MANIFEST};
use imgbuild::kube;
use imgbuild::pki::CaKind;
use imgbuild::state::{self, State};
use proto::pin::{CaPin, detached_jws, verify_detached_jws};
use support::control_plane::ControlPlane;
use support::*;

#[test]
fn bootstrap_signer_signature_equals_ours_and_pins_agree() {
    require_tool("openssl", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap();
    let st = State::new(dir.path().join("state"));
    state::init(&st, &cluster, &[]).unwrap();
    let ca_pem = std::fs::read_to_string(st.pki_dir().join("ca.crt")).unwrap();

    // The control plane signs and serves with our cluster CA.
    let plane = ControlPlane::start(&dir.path().join("control-plane"), &st, &cluster);
    let tokens = st.tokens().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let join = tokens.join_token(now).unwrap().clone();

    // What an operator applies: the Secret, the RBAC bindings and cluster-info for this API; and
    // the CoreDNS add-on a master whose image carries CoreDNS applies (the apiserver validates
    // every object; no node runs here, so its pods stay Pending).
    let mut objects = vec![kube::bootstrap_token_secret(&join)];
    objects.extend(kube::node_bootstrap_rbac(imgbuild::tokens::DEFAULT_NODE_GROUP));
    objects.extend(kube::cluster_info(&ca_pem, &plane.api_url));
    objects.extend(kube::coredns(
        "registry.k8s.io/coredns/coredns:v1.12.1",
        "10.40.0.10",
        "k8s.org",
        "node-role.kubernetes.io/master",
    ));
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, kube::to_yaml(&objects)).unwrap();
    let out = plane.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));

    let key = format!("jws-kubeconfig-{}", join.id());
    let cm = wait_for("the bootstrap signer's JWS in cluster-info", Duration::from_secs(90), || {
        let out = plane.kubectl(&["-n", "kube-public", "get", "configmap", "cluster-info", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"][&key].is_string().then_some(v)
    });
    let served_kubeconfig = cm["data"]["kubeconfig"].as_str().unwrap();
    let theirs = cm["data"][&key].as_str().unwrap();
    assert_eq!(
        served_kubeconfig,
        kube::cluster_info_kubeconfig(&ca_pem, &plane.api_url),
        "kubeconfig bytes changed on the way"
    );
    assert_eq!(detached_jws(served_kubeconfig, &join.token), theirs, "our JWS differs from the bootstrap signer's");
    verify_detached_jws(theirs, served_kubeconfig, &join.token).unwrap();

    // Cluster DNS at the manifest's address, the Deployment on the pinned image.
    let out = plane.kubectl(&["-n", "kube-system", "get", "service", "kube-dns", "-o", "jsonpath={.spec.clusterIP}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "10.40.0.10", "{}", String::from_utf8_lossy(&out.stderr));
    let out = plane.kubectl(&[
        "-n",
        "kube-system",
        "get",
        "deployment",
        "coredns",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "registry.k8s.io/coredns/coredns:v1.12.1");

    // The pin kubeadm users compute with openssl, from the CA the apiserver serves with.
    let served_ca = st.pki_dir().join("ca.crt");
    let ours = CaPin::of_cert_pem(&std::fs::read_to_string(&served_ca).unwrap()).unwrap();
    assert_eq!(ours.to_string(), openssl_pin(&served_ca));
    assert_eq!(ours, st.ca(CaKind::Cluster).unwrap().pin());
}
