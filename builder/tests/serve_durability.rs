//! The embedded store under `kill -9`: nothing the server acknowledged is lost.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::Role;
use proto::wire::{MachineIdentity, Phase};
use support::sim::{Sim, mac};
use support::*;

/// Unknown machines become workers; a pod CIDR with room for them.
pub fn fleet_manifest(t: String) -> String {
    t.replace("policy: known-only", "policy: auto-worker").replace("podCIDR: 10.30.0.0/16", "podCIDR: 172.16.0.0/12")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_enrollment_or_report() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), fleet_manifest);
    let serve = ServeProcess::start(&st.root, "127.0.0.1:0", None);
    let now = time::OffsetDateTime::now_utc();
    let sim = Arc::new(Sim {
        servers: vec![serve.url.clone()],
        pin: st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin(),
        token: Some(st.tokens().unwrap().enrollment_token(Role::Worker, now).unwrap().token.clone()),
        deadline: Duration::from_secs(2),
    });
    /// machine MAC -> (node, last acknowledged report)
    type Acked = HashMap<String, (String, Option<String>)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let sem = Arc::new(tokio::sync::Semaphore::new(24));
    let mut tasks = Vec::new();
    for i in 0..600 {
        let (sim, acked, sem) = (sim.clone(), acked.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let m = mac(i);
            let Ok(e) = sim.enroll(MachineIdentity { uuid: None, serial: None, macs: vec![m.clone()] }).await else {
                return;
            };
            acked.lock().unwrap().insert(m.clone(), (e.node.clone(), None));
            for r in ["report-1", "report-2"] {
                if e.report(Phase::Fetch, r).await.is_err() {
                    return;
                }
                acked.lock().unwrap().get_mut(&m).unwrap().1 = Some(r.to_string());
            }
        }));
    }
    // Kill the server in the middle of it.
    wait_for("150 acknowledged enrollments", Duration::from_secs(60), || {
        (acked.lock().unwrap().len() >= 150).then_some(())
    });
    serve.kill9();
    // What was in flight is not acknowledged: stop the clients.
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() < 600, "the kill came too late to prove anything");

    let serve = ServeProcess::start(&st.root, "127.0.0.1:0", None);
    let nodes: HashMap<String, _> = serve.nodes().into_iter().map(|s| (s.machine.clone(), s)).collect();
    for (m, (node, report)) in &acked {
        let s =
            nodes.get(&format!("macs:{m}")).unwrap_or_else(|| panic!("acknowledged enrollment of {m} as {node} lost"));
        assert_eq!(s.node.as_deref(), Some(node.as_str()));
        match report.as_deref() {
            Some("report-2") => assert_eq!(s.message, "report-2", "{m}: acknowledged report lost"),
            Some("report-1") => {
                assert!(s.message == "report-1" || s.message == "report-2", "{m}: acknowledged report lost")
            }
            _ => {}
        }
    }
    let names: std::collections::HashSet<_> = nodes.values().filter_map(|s| s.node.clone()).collect();
    assert_eq!(names.len(), nodes.len(), "a node name was given twice");
}
