//! Loopback integration of `imgbuild serve` and firstboot: the real server and the real agent
//! (host and systemd effects recorded), end to end through enroll, config, sign and report, and
//! every refusal a demanding operator would check. What an attacker tries is in attacks.rs.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::Path;
use std::time::Duration;

use firstboot::agent::client::{Backoff, Client};
use firstboot::agent::host::Recorder;
use firstboot::agent::{Agent, AgentError, Options, Outcome};
use imgbuild::serve::{Backend, ServeOptions};
use proto::Role;
use proto::wire::*;
use rcgen::PublicKeyData;
use support::*;

fn opts(root: &Path, config: &Path) -> Options {
    let mut o = Options::new(root);
    o.config = Some(config.to_path_buf());
    o.join = false;
    o.deadline = Duration::from_secs(20);
    o.backoff = Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(200) };
    o
}

async fn start(st: &imgbuild::state::State) -> imgbuild::serve::Running {
    let o = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: Backend::Embedded,
        audit_file: true,
        boot: None,
        limits: Default::default(),
    };
    imgbuild::serve::start(st, &o).await.unwrap()
}

async fn run_node(
    dir: &Path,
    name: &str,
    mac: &str,
    boot: &proto::bootcfg::BootConfig,
) -> (Result<Outcome, AgentError>, Vec<String>) {
    let root = node_root(&dir.join(name), mac);
    let cfg = root.join("payload.json");
    std::fs::write(&cfg, serde_json::to_string(boot).unwrap()).unwrap();
    let mut agent = Agent::new(opts(&root, &cfg), Recorder::default(), Recorder::default()).unwrap();
    let r = agent.run().await;
    let mut effects = agent.host.effects.clone();
    effects.extend(agent.systemd.effects.clone());
    (r, effects)
}

/// Operators' SSH keys (made with ssh-keygen -t ed25519).
const CLUSTER_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGggOPvVLpf1bZvT1Vphrs6l+wf2RuIKkOKaF06sAHvT ops@site";
const NODE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMsZ2dcE9mY2nEVpTfj1conNiZ19zFFf8bP3rs6jiVrC rack-a@site";

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_enroll_get_certificates_and_report() {
    let dir = tempfile::tempdir().unwrap();
    // An operators' key for every node, and one more for k8s-master1 alone.
    let (st, cluster) = state_with(dir.path(), |t| {
        t.replacen("sshAuthorizedKeys: []", &format!("sshAuthorizedKeys: [\"{CLUSTER_KEY}\"]"), 1).replacen(
            "      mac: \"52:54:00:03:01:11\"\n",
            &format!("      mac: \"52:54:00:03:01:11\"\n      sshAuthorizedKeys: [\"{NODE_KEY}\"]\n"),
            1,
        )
    });
    let server = start(&st).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    let mut tasks = Vec::new();
    let mut run_effects = std::collections::HashMap::new();
    for n in &cluster.nodes {
        // Masters with their own credential; workers with the worker token.
        let boot = match n.role {
            Role::Master => node_payload(&st, &n.name, &url),
            _ => payload(&st, n.role, &url),
        };
        let (dir, name, mac) = (dir.path().to_path_buf(), n.name.clone(), n.mac.as_ref().unwrap().to_string());
        tasks.push(tokio::spawn(async move { (name.clone(), run_node(&dir, &name, &mac, &boot).await) }));
    }
    for t in tasks {
        let (name, (r, effects)) = t.await.unwrap();
        match r {
            Ok(Outcome::Provisioned { node, .. }) => assert_eq!(node, name),
            other => panic!("{name}: {other:?}"),
        }
        assert!(effects.contains(&format!("hostname {name}")), "{name}: {effects:?}");
        run_effects.insert(name, effects);
    }

    // spec.hosts on the node before it enrolled: DNS and NTP drop-ins (services restarted),
    // root's SSH keys (the cluster's and the node's own) private to root.
    let w1 = dir.path().join("k8s-worker1");
    let resolved = std::fs::read_to_string(proto::paths::under(&w1, proto::paths::RESOLVED_DROPIN)).unwrap();
    assert!(resolved.contains("[Resolve]\nDNS=192.168.3.1\nDomains=k8s.org\n"), "{resolved}");
    let ntp = std::fs::read_to_string(proto::paths::under(&w1, proto::paths::TIMESYNCD_DROPIN)).unwrap();
    assert!(ntp.contains("[Time]\nNTP=192.168.3.1\n"), "{ntp}");
    let keys_of = |node: &str| proto::paths::under(&dir.path().join(node), proto::paths::ROOT_AUTHORIZED_KEYS);
    let w1_keys = std::fs::read_to_string(keys_of("k8s-worker1")).unwrap();
    assert!(w1_keys.contains(CLUSTER_KEY) && !w1_keys.contains(NODE_KEY), "{w1_keys}");
    let m1_keys = keys_of("k8s-master1");
    let text = std::fs::read_to_string(&m1_keys).unwrap();
    assert!(text.contains(CLUSTER_KEY) && text.contains(NODE_KEY), "{text}");
    assert_eq!((mode(&m1_keys), mode(m1_keys.parent().unwrap())), (0o600, 0o700));
    let m2_keys = std::fs::read_to_string(keys_of("k8s-master2")).unwrap();
    assert!(!m2_keys.contains(NODE_KEY), "k8s-master1's own key on k8s-master2: {m2_keys}");
    let effects = &run_effects["k8s-worker1"];
    let at = |e: &str| effects.iter().position(|x| x == e).unwrap_or_else(|| panic!("no {e} in {effects:?}"));
    assert!(at("systemctl restart systemd-resolved.service") < at("systemctl restart systemd-timesyncd.service"));

    // The server's view, as `imgbuild nodes` shows it.
    let status: Vec<NodeStatus> = server.app.fleet.status().await.unwrap();
    assert_eq!(status.len(), 6);
    for s in &status {
        let proof = if s.role == Role::Master { Proof::Credential } else { Proof::WorkerToken };
        assert_eq!(s.proof, Some(proof), "{s:?}");
        assert!(s.key.as_deref().is_some_and(|k| k.starts_with("sha256:")), "{s:?}");
        assert_eq!(s.phase, Some(Phase::Done), "{s:?}");
        assert_eq!(s.status, Some(PhaseStatus::Succeeded), "{s:?}");
        let want = if s.role == Role::Master { 12 } else { 2 };
        assert_eq!(s.certificates, want, "{s:?}");
        assert!(s.errors.is_empty());
    }
    let node = server.app.fleet.node("k8s-worker2").await.unwrap().unwrap();
    let phases: Vec<Phase> = node.reports.iter().map(|r| r.phase).collect();
    assert_eq!(phases, Phase::ALL, "every phase reported once, in order");

    // On "disk": keys 0600 that match their certificates, certificates from the right CA.
    let m1 = dir.path().join("k8s-master1");
    for purpose in CertPurpose::ALL {
        let (cert, key) = proto::paths::cert_paths(purpose);
        let (cert, key) = (proto::paths::under(&m1, cert), proto::paths::under(&m1, key));
        assert_eq!(mode(&key), 0o600, "{purpose}");
        let cert_pem = std::fs::read_to_string(&cert).unwrap();
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap();
        let info = imgbuild::pki::CertInfo::parse(&cert_pem).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let der: rustls_pki_types::CertificateDer = der;
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            x.public_key().raw,
            key.subject_public_key_info().as_slice(),
            "{purpose}: certificate is not for the node's key"
        );
        assert!(!info.subject.is_empty());
    }
    assert_eq!(mode(&proto::paths::under(&m1, "/etc/kubernetes/pki/ca.key")), 0o600);
    assert!(!dir.path().join("k8s-worker1/etc/kubernetes/pki/ca.key").exists(), "a worker got a CA key");
    assert_eq!(mode(&proto::paths::under(&m1, proto::paths::STATE_FILE)), 0o600);

    // Every enrollment and signature is in the audit log.
    let audit = std::fs::read_to_string(st.root.join("audit.log")).unwrap();
    assert_eq!(audit.lines().filter(|l| l.contains("\"event\":\"enrolled\"")).count(), 6);
    assert_eq!(audit.lines().filter(|l| l.contains("\"event\":\"signed\"")).count(), 3 * 12 + 3 * 2);

    // A second boot only reports.
    let (r, _) = run_node(dir.path(), "k8s-worker2", "52:54:00:03:01:22", &payload(&st, Role::Worker, &url)).await;
    assert!(matches!(r, Ok(Outcome::AlreadyProvisioned { .. })), "{r:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    let server = start(&st).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let boot = |role| payload(&st, role, &url);
    let refused = |e: AgentError| match e {
        AgentError::Phase { error, .. } => error.code().to_string(),
        other => panic!("{other}"),
    };

    // A server under another CA: fails closed, naming the pins.
    let mut wrong = boot(Role::Worker);
    wrong.ca_pin = format!("sha256:{}", "00".repeat(32)).parse().unwrap();
    let (r, _) = run_node(dir.path(), "wrongpin", "52:54:00:03:01:21", &wrong).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("not under the pinned CA sha256:0000"), "{e}");

    // A machine not in the inventory (policy known-only), and the worker token on a master's
    // machine: refused, without saying why to the machine (the audit log says).
    let (r, _) = run_node(dir.path(), "stranger", "52:54:00:99:99:99", &boot(Role::Worker)).await;
    assert_eq!(refused(r.unwrap_err()), "refused");
    let (r, _) = run_node(dir.path(), "m1-as-worker", "52:54:00:03:01:11", &boot(Role::Worker)).await;
    let e = r.unwrap_err();
    assert!(!e.to_string().contains("k8s-master1"), "the refusal names the inventory: {e}");
    assert_eq!(refused(e), "refused");

    // worker1 enrolls; a second machine (another UUID, same MAC) claiming it is refused, and the
    // attempt is a conflict on the node for the operator to see.
    let (r, _) = run_node(dir.path(), "w1", "52:54:00:03:01:21", &boot(Role::Worker)).await;
    assert!(r.is_ok(), "{r:?}");
    let impostor = node_root(&dir.path().join("impostor"), "52:54:00:03:01:21");
    std::fs::create_dir_all(impostor.join("sys/class/dmi/id")).unwrap();
    std::fs::write(impostor.join("sys/class/dmi/id/product_uuid"), "4c4c4544-0042-3510-8052-b4c04f4d4e31\n").unwrap();
    let cfg = impostor.join("payload.json");
    std::fs::write(&cfg, serde_json::to_string(&boot(Role::Worker)).unwrap()).unwrap();
    let mut agent = Agent::new(opts(&impostor, &cfg), Recorder::default(), Recorder::default()).unwrap();
    assert_eq!(refused(agent.run().await.unwrap_err()), "refused");
    let w1 = server.app.fleet.node("k8s-worker1").await.unwrap().unwrap();
    assert_eq!(w1.conflicts.len(), 1, "{:?}", w1.conflicts);
    assert_eq!(w1.conflicts[0].machine, "uuid:4c4c4544-0042-3510-8052-b4c04f4d4e31");

    // A revoked node credential, and a spent one-use worker token.
    let mut tokens = st.tokens().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let m1_boot = node_payload(&st, "k8s-master1", &url);
    let m1_token = tokens.node_credential("k8s-master1", now).unwrap().id().to_string();
    tokens.revoke(&m1_token, now).unwrap();
    tokens.save().unwrap();
    let (r, _) = run_node(dir.path(), "m1", "52:54:00:03:01:11", &m1_boot).await;
    assert_eq!(refused(r.unwrap_err()), "token-revoked");
    let t = tokens
        .create(
            imgbuild::tokens::NewToken {
                ttl: Some(Duration::from_secs(600)),
                usages: [imgbuild::tokens::TokenUsage::Enrollment].into_iter().collect(),
                groups: vec![],
                description: "one".into(),
                role: Some(Role::Worker),
                node: None,
                max_uses: Some(1),
            },
            now,
        )
        .unwrap()
        .token
        .clone();
    tokens.save().unwrap();
    let mut one = boot(Role::Worker);
    one.token = Some(t);
    let (r, _) = run_node(dir.path(), "w2", "52:54:00:03:01:22", &one).await;
    assert!(r.is_ok(), "{r:?}");
    let (r, _) = run_node(dir.path(), "w3", "52:54:00:03:01:23", &one).await;
    assert_eq!(refused(r.unwrap_err()), "token-exhausted");

    // A worker asking for a control-plane certificate, and for a foreign name.
    let w1 = dir.path().join("w1");
    let client = enrolled_client(&w1, &url, &st);
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = firstboot::agent::csr(&key, None).unwrap();
    let e = client
        .post::<_, SignResponse>(
            PATH_SIGN,
            &SignRequest { csrs: vec![CsrRequest { purpose: CertPurpose::Apiserver, csr: csr.clone() }] },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::CsrRefused), "{e}");
    let mut p = rcgen::CertificateParams::new(vec!["k8s-worker2".to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let foreign = p.serialize_request(&key).unwrap().pem().unwrap();
    let e = client
        .post::<_, SignResponse>(
            PATH_SIGN,
            &SignRequest { csrs: vec![CsrRequest { purpose: CertPurpose::KubeletServing, csr: foreign }] },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("foreign name"), "{e}");

    // Without the enrollment certificate there is no config.
    let anon = Client::new(
        std::slice::from_ref(&url),
        st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin(),
        None,
        std::time::Instant::now() + Duration::from_secs(1),
    )
    .unwrap();
    let e = anon.get::<NodeConfig>(PATH_CONFIG).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotEnrolled));

    // Failed attempts from one source are rate-limited.
    let bad: proto::BootstrapToken = "zzzzzz.zzzzzzzzzzzzzzzz".parse().unwrap();
    let mut codes = Vec::new();
    for _ in 0..30 {
        let mut conn = RawTls::open(server.addr, st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin(), None).await;
        let (_, body) = conn.enroll(Some(&bad), &["52:54:00:03:01:21"], &key, None).await;
        let code = serde_json::from_str::<ErrorBody>(&body).unwrap().code;
        codes.push(code);
        if code == ErrorCode::RateLimited {
            break;
        }
    }
    // 20 failures per minute are allowed from one source; the five enrollment refusals above
    // count too (the wrong pin never reached the server). Then 429.
    assert_eq!(codes.iter().filter(|c| **c == ErrorCode::InvalidToken).count(), 15, "{codes:?}");
    assert_eq!(codes.last(), Some(&ErrorCode::RateLimited), "{codes:?}");

    let audit = std::fs::read_to_string(st.root.join("audit.log")).unwrap();
    for want in [
        "\"code\":\"refused\"",
        "not in the inventory and the policy is known-only",
        "inventory master k8s-master1",
        "\"event\":\"conflict\"",
        "\"code\":\"token-revoked\"",
        "\"code\":\"token-exhausted\"",
        "\"code\":\"csr-refused\"",
        "\"code\":\"invalid-token\"",
    ] {
        assert!(audit.contains(want), "audit log lacks {want}");
    }
    server.shutdown().await;
}

/// The connection a machine enrolled on speaks for its node, and only that connection, and only
/// while the node is bound to the key it enrolled with. A new key for a bound node is refused
/// until the operator resets the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_connection_speaks_for_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    let server = start(&st).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let pin = st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin();
    let token = payload(&st, Role::Worker, &url).token.unwrap();
    let config = async |c: &mut RawTls| match c.call("GET", PATH_CONFIG, b"").await {
        (200, body) => Ok(serde_json::from_str::<NodeConfig>(&body).unwrap()),
        (_, body) => Err(serde_json::from_str::<ErrorBody>(&body).unwrap()),
    };
    let w1 = ["52:54:00:03:01:21"];

    // A failed enrollment binds nothing.
    let mut stranger = RawTls::open(server.addr, pin, None).await;
    let bad: proto::BootstrapToken = "zzzzzz.zzzzzzzzzzzzzzzz".parse().unwrap();
    let (status, _) = stranger.enroll(Some(&bad), &w1, &rcgen::KeyPair::generate().unwrap(), None).await;
    assert_eq!(status, 401);
    assert_eq!(config(&mut stranger).await.unwrap_err().code, ErrorCode::NotEnrolled);

    // Enrolled without showing a certificate: this connection is k8s-worker1's.
    let mut first = RawTls::open(server.addr, pin, None).await;
    let (status, body) = first.enroll(Some(&token), &w1, &rcgen::KeyPair::generate().unwrap(), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(config(&mut first).await.unwrap().node.name, "k8s-worker1");
    // Another connection without the certificate is nobody.
    assert_eq!(config(&mut RawTls::open(server.addr, pin, None).await).await.unwrap_err().code, ErrorCode::NotEnrolled);

    // The machine comes again with a new key (a reinstall, or someone else): refused, and the
    // node stays with the key it has.
    let mut second = RawTls::open(server.addr, pin, None).await;
    let (status, body) = second.enroll(Some(&token), &w1, &rcgen::KeyPair::generate().unwrap(), None).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(config(&mut first).await.unwrap().node.name, "k8s-worker1");

    // The operator resets the node: the old connection speaks for nobody, a new enrollment binds.
    server.app.fleet.reset("k8s-worker1").await.unwrap();
    assert_eq!(config(&mut first).await.unwrap_err().code, ErrorCode::NotEnrolled);
    let mut third = RawTls::open(server.addr, pin, None).await;
    let (status, body) = third.enroll(Some(&token), &w1, &rcgen::KeyPair::generate().unwrap(), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(config(&mut third).await.unwrap().node.name, "k8s-worker1");
    server.shutdown().await;
}

/// A client with the enrollment certificate the node at `root` holds.
fn enrolled_client(root: &Path, url: &str, st: &imgbuild::state::State) -> Client {
    let rec: firstboot::agent::record::Record =
        serde_json::from_slice(&std::fs::read(proto::paths::under(root, proto::paths::STATE_FILE)).unwrap()).unwrap();
    let key = std::fs::read_to_string(proto::paths::under(root, "/var/lib/firstboot/enroll.key")).unwrap();
    let mut c = Client::new(
        &[url.to_string()],
        st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin(),
        Some((rec.client_cert.as_deref().unwrap(), &key)),
        std::time::Instant::now() + Duration::from_secs(5),
    )
    .unwrap();
    c.backoff = Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(10) };
    c
}

/// TLS 1.3 and HTTP/1.1 only: the channel binding is the TLS 1.3 exporter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_3_and_http_1_1_only() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    let server = start(&st).await;
    let ca = std::fs::read_to_string(st.pki_dir().join("ca.crt")).unwrap();
    let url = format!("https://127.0.0.1:{}{PATH_HEALTH}", server.addr.port());
    let client = |tls: rustls::ClientConfig| reqwest::Client::builder().tls_backend_preconfigured(tls).build().unwrap();
    let tls = proto::tls::client_config(&ca, None).unwrap();
    let r = client(tls).get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.text().await.unwrap(), "ok");
    // A TLS 1.2 client gets no connection.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in proto::tls::certs_from_pem(&ca, "ca").unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let tls12 = rustls::ClientConfig::builder_with_provider(proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert!(client(tls12).get(&url).send().await.is_err(), "a TLS 1.2 handshake succeeded");
    server.shutdown().await;
}
