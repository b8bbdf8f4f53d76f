//! Two `imgbuild serve` replicas sharing one etcd (Debian's etcd-server, TLS): concurrent
//! enrollments through both never give one node to two machines, nor one name or pod range to
//! two nodes.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use imgbuild::serve::store::{EtcdConfig, EtcdStore, Store};
use proto::Role;
use proto::wire::{ErrorCode, MachineIdentity};
use support::sim::{Sim, mac};
use support::*;

fn serve_with_etcd(state: &std::path::Path, etcd: &EtcdCluster) -> ServeProcess {
    // The replicas share etcd; each has its own copy of the state dir, as on two hosts.
    let _ = std::fs::remove_file(state.join("serve.json"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(state.join("serve.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
        .args(["--state", state.to_str().unwrap(), "serve", "--listen", "127.0.0.1:0"])
        .args(["--etcd-endpoints", &etcd.endpoints.join(",")])
        .args([
            "--etcd-ca",
            etcd.ca.to_str().unwrap(),
            "--etcd-cert",
            etcd.client_cert.to_str().unwrap(),
            "--etcd-key",
            etcd.client_key.to_str().unwrap(),
        ])
        .stderr(log)
        .spawn()
        .unwrap();
    let guard = ChildGuard(child, "imgbuild serve".into());
    let run =
        wait_for("imgbuild serve to listen", Duration::from_secs(30), || std::fs::read(state.join("serve.json")).ok());
    let run: serde_json::Value = serde_json::from_slice(&run).unwrap();
    ServeProcess { guard, url: format!("https://{}", run["listen"].as_str().unwrap()), state: state.to_path_buf() }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_assign_one_node_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (st, cluster) = state_with(dir.path(), |t| {
        t.replace("policy: known-only", "policy: auto-worker")
            .replace("podCIDR: 10.30.0.0/16", "podCIDR: 172.16.0.0/12")
    });
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), &st, &cluster, 1);
    let second = dir.path().join("state-b");
    copy_dir(&st.root, &second);
    let a = serve_with_etcd(&st.root, &etcd);
    let b = serve_with_etcd(&second, &etcd);
    let now = time::OffsetDateTime::now_utc();
    let pin = st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin();
    let token = st.tokens().unwrap().enrollment_token(Role::Worker, now).unwrap().token.clone();
    let sims: Vec<Arc<Sim>> = [&a, &b]
        .iter()
        .map(|s| {
            Arc::new(Sim {
                servers: vec![s.url.clone()],
                pin,
                token: Some(token.clone()),
                deadline: Duration::from_secs(30),
            })
        })
        .collect();

    let mut tasks = Vec::new();
    // 120 unknown machines, alternating between the replicas: auto-assigned workers.
    for i in 0..120 {
        let sim = sims[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let id = MachineIdentity { uuid: None, serial: None, macs: vec![mac(i)] };
            (format!("macs:{}", mac(i)), sim.enroll(id).await.map(|e| e.node).map_err(|e| e.code()))
        }));
    }
    // Each inventory worker claimed by two different machines (own UUIDs, the node's MAC) at
    // once, one through each replica: one may win, never both.
    for (j, n) in cluster.nodes_with(Role::Worker).enumerate() {
        for (k, sim) in sims.iter().enumerate() {
            let sim = sim.clone();
            let uuid = format!("00000000-0000-0000-0000-0000000000{j}{k}");
            let id =
                MachineIdentity { uuid: Some(uuid), serial: None, macs: vec![n.mac.as_ref().unwrap().to_string()] };
            let name = n.name.clone();
            tasks.push(tokio::spawn(async move {
                (format!("{name}/{k}"), sim.enroll(id).await.map(|e| e.node).map_err(|e| e.code()))
            }));
        }
    }
    let mut results = HashMap::new();
    for t in tasks {
        let (who, r) = t.await.unwrap();
        results.insert(who, r);
    }
    for i in 0..120 {
        let r = &results[&format!("macs:{}", mac(i))];
        assert!(r.is_ok(), "machine {i}: {r:?}");
    }
    for n in cluster.nodes_with(Role::Worker) {
        let claims: Vec<_> = (0..2).map(|k| results[&format!("{}/{k}", n.name)].clone()).collect();
        let winners = claims.iter().filter(|c| c.as_deref() == Ok(n.name.as_str())).count();
        assert_eq!(winners, 1, "{}: {claims:?}", n.name);
        assert!(claims.contains(&Err(Some(ErrorCode::Refused))), "{}: {claims:?}", n.name);
    }

    // The source of truth, read straight from etcd.
    let store = Store::Etcd(
        EtcdStore::new(EtcdConfig {
            endpoints: etcd.endpoints.clone(),
            ca_pem: Some(std::fs::read_to_string(&etcd.ca).unwrap()),
            client_cert_pem: Some(std::fs::read_to_string(&etcd.client_cert).unwrap()),
            client_key_pem: Some(std::fs::read_to_string(&etcd.client_key).unwrap()),
            prefix: format!("/imgbuild/{}/", cluster.name),
        })
        .unwrap(),
    );
    let nodes: Vec<imgbuild::serve::fleet::records::NodeRecord> = store
        .list("nodes/")
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| serde_json::from_slice(&e.value).unwrap())
        .collect();
    assert_eq!(nodes.len(), 123);
    let machines: HashSet<_> = nodes.iter().map(|n| n.machine.clone()).collect();
    assert_eq!(machines.len(), 123, "a machine holds two nodes");
    // Both replicas see the same fleet.
    assert_eq!(a.nodes().len(), b.nodes().len());
}
