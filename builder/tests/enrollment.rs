//! Loopback integration of `imgbuild serve` and firstboot: the real server and the real agent
//! (host and systemd effects recorded), end to end through enroll, config, sign and report, and
//! every refusal a demanding operator would check.

mod support;

use std::path::Path;
use std::time::Duration;

use firstboot::agent::client::{Backoff, Client};
use firstboot::agent::host::Recorder;
use firstboot::agent::{Agent, AgentError, Options, Outcome};
use imgbuild::serve::fleet::NodeStatus;
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

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_nodes_enroll_get_certificates_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let (st, cluster) = state_with(dir.path(), |t| t);
    let server = start(&st).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    let mut tasks = Vec::new();
    for n in &cluster.nodes {
        let boot = payload(&st, n.role, &url);
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
    }

    // The server's view, as `imgbuild nodes` shows it.
    let status: Vec<NodeStatus> = server.app.fleet.status().await.unwrap();
    assert_eq!(status.len(), 6);
    for s in &status {
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

    // A server under another CA: fails closed, naming the pins.
    let mut wrong = boot(Role::Worker);
    wrong.ca_pin = format!("sha256:{}", "00".repeat(32)).parse().unwrap();
    let (r, _) = run_node(dir.path(), "wrongpin", "52:54:00:03:01:21", &wrong).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("not under the pinned CA sha256:0000"), "{e}");

    // A machine not in the inventory (policy known-only).
    let (r, _) = run_node(dir.path(), "stranger", "52:54:00:99:99:99", &boot(Role::Worker)).await;
    assert!(r.unwrap_err().to_string().contains("not in the inventory"));

    // A worker token on a master's machine.
    let (r, _) = run_node(dir.path(), "m1-as-worker", "52:54:00:03:01:11", &boot(Role::Worker)).await;
    assert!(r.unwrap_err().to_string().contains("the token is for role worker"));

    // worker1 enrolls; a second machine (another UUID, same MAC) claiming it is refused.
    let (r, _) = run_node(dir.path(), "w1", "52:54:00:03:01:21", &boot(Role::Worker)).await;
    assert!(r.is_ok(), "{r:?}");
    let impostor = node_root(&dir.path().join("impostor"), "52:54:00:03:01:21");
    std::fs::create_dir_all(impostor.join("sys/class/dmi/id")).unwrap();
    std::fs::write(impostor.join("sys/class/dmi/id/product_uuid"), "4c4c4544-0042-3510-8052-b4c04f4d4e31\n").unwrap();
    let cfg = impostor.join("payload.json");
    std::fs::write(&cfg, serde_json::to_string(&boot(Role::Worker)).unwrap()).unwrap();
    let mut agent = Agent::new(opts(&impostor, &cfg), Recorder::default(), Recorder::default()).unwrap();
    let e = agent.run().await.unwrap_err().to_string();
    assert!(e.contains("already bound to another machine"), "{e}");

    // Revoked and exhausted tokens.
    let mut tokens = st.tokens().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let master_token = tokens.enrollment_token(Role::Master, now).unwrap().id().to_string();
    let master_boot = boot(Role::Master);
    tokens.revoke(&master_token, now).unwrap();
    tokens.save().unwrap();
    let (r, _) = run_node(dir.path(), "m1", "52:54:00:03:01:11", &master_boot).await;
    assert!(r.unwrap_err().to_string().contains("was revoked"));
    let t = tokens
        .create(
            imgbuild::tokens::NewToken {
                ttl: Some(Duration::from_secs(600)),
                usages: [imgbuild::tokens::TokenUsage::Enrollment].into_iter().collect(),
                groups: vec![],
                description: "one".into(),
                role: Some(Role::Worker),
                max_uses: Some(1),
            },
            now,
        )
        .unwrap()
        .token
        .clone();
    tokens.save().unwrap();
    let mut one = boot(Role::Worker);
    one.token = t;
    let (r, _) = run_node(dir.path(), "w2", "52:54:00:03:01:22", &one).await;
    assert!(r.is_ok(), "{r:?}");
    let (r, _) = run_node(dir.path(), "w3", "52:54:00:03:01:23", &one).await;
    assert!(r.unwrap_err().to_string().contains("its limit"));

    // A worker asking for a control-plane certificate, and for a foreign name.
    let w1 = dir.path().join("w1");
    let client = enrolled_client(&w1, &url, &st);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
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
    let mut bad = boot(Role::Worker);
    bad.token = "zzzzzz.zzzzzzzzzzzzzzzz".parse().unwrap();
    let bad_req = EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token: bad.token.clone(),
        identity: MachineIdentity { uuid: None, serial: None, macs: vec!["52:54:00:03:01:21".into()] },
        image: None,
        csr,
    };
    let mut codes = Vec::new();
    for _ in 0..30 {
        let code = anon.post::<_, EnrollResponse>(PATH_ENROLL, &bad_req).await.unwrap_err().code();
        codes.push(code);
        if code == Some(ErrorCode::RateLimited) {
            break;
        }
    }
    // 20 failures per minute are allowed from one source; the five enrollment refusals above
    // count too. Then 429.
    assert_eq!(codes.iter().filter(|c| **c == Some(ErrorCode::InvalidToken)).count(), 15, "{codes:?}");
    assert_eq!(codes.last(), Some(&Some(ErrorCode::RateLimited)), "{codes:?}");

    let audit = std::fs::read_to_string(st.root.join("audit.log")).unwrap();
    for code in [
        "UnknownMachine",
        "TokenRole",
        "IdentityConflict",
        "TokenRevoked",
        "TokenExhausted",
        "CsrRefused",
        "InvalidToken",
    ] {
        assert!(audit.contains(code), "audit log lacks a refusal {code}");
    }
    server.shutdown().await;
}

/// One TLS connection, HTTP/1.1 requests on it one after another: a reqwest client may open a
/// second connection when a request follows a response at once (its pool takes the first one
/// back asynchronously), and these checks are about one connection.
struct OneConnection(tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

impl OneConnection {
    async fn open(addr: std::net::SocketAddr, pin: proto::pin::CaPin) -> Self {
        let cfg = proto::tls::pinned_client_config(pin, Default::default()).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        OneConnection(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap())
    }

    /// Status and body of one request.
    async fn call(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        self.0.write_all(&[head.as_bytes(), body].concat()).await.unwrap();
        self.0.flush().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(self.0.read_u8().await.unwrap());
        }
        let head = String::from_utf8(head).unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).await.unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    async fn enroll(&mut self, req: &EnrollRequest) -> EnrollResponse {
        let (status, body) = self.call("POST", PATH_ENROLL, &serde_json::to_vec(req).unwrap()).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn config(&mut self) -> Result<NodeConfig, ErrorBody> {
        match self.call("GET", PATH_CONFIG, b"").await {
            (200, body) => Ok(serde_json::from_str(&body).unwrap()),
            (_, body) => Err(serde_json::from_str(&body).unwrap()),
        }
    }
}

/// The connection a machine enrolled on speaks for its node, and only that connection, and only
/// while the node holds the key it enrolled with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_connection_speaks_for_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    let server = start(&st).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let pin = st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin();
    let token = payload(&st, Role::Worker, &url).token;
    let enroll = |token: &proto::BootstrapToken| EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token: token.clone(),
        identity: MachineIdentity { uuid: None, serial: None, macs: vec!["52:54:00:03:01:21".into()] },
        image: None,
        csr: sim::Prepared::new().csr,
    };

    // A failed enrollment binds nothing.
    let mut stranger = OneConnection::open(server.addr, pin).await;
    let bad: proto::BootstrapToken = "zzzzzz.zzzzzzzzzzzzzzzz".parse().unwrap();
    let (status, _) = stranger.call("POST", PATH_ENROLL, &serde_json::to_vec(&enroll(&bad)).unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(stranger.config().await.unwrap_err().code, ErrorCode::NotEnrolled);

    // Enrolled without showing a certificate: this connection is k8s-worker1's.
    let mut first = OneConnection::open(server.addr, pin).await;
    assert_eq!(first.enroll(&enroll(&token)).await.node.unwrap().name, "k8s-worker1");
    assert_eq!(first.config().await.unwrap().node.name, "k8s-worker1");
    // Another connection without the certificate is nobody.
    let nobody = OneConnection::open(server.addr, pin).await.config().await.unwrap_err();
    assert_eq!(nobody.code, ErrorCode::NotEnrolled);

    // The machine enrolls again with a new key (a reinstall): the first connection, bound to the
    // old key, no longer speaks for k8s-worker1; the new one does.
    let mut second = OneConnection::open(server.addr, pin).await;
    second.enroll(&enroll(&token)).await;
    let e = first.config().await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotEnrolled);
    assert!(e.error.contains("superseded"), "{}", e.error);
    assert_eq!(second.config().await.unwrap().node.name, "k8s-worker1");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_http2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    let server = start(&st).await;
    let ca = std::fs::read_to_string(st.pki_dir().join("ca.crt")).unwrap();
    for (alpn, want) in [(&b"h2"[..], reqwest::Version::HTTP_2), (&b"http/1.1"[..], reqwest::Version::HTTP_11)] {
        let mut tls = proto::tls::client_config(&ca, None).unwrap();
        tls.alpn_protocols = vec![alpn.to_vec()];
        let http = reqwest::Client::builder().tls_backend_preconfigured(tls).build().unwrap();
        let r = http.get(format!("https://127.0.0.1:{}{PATH_HEALTH}", server.addr.port())).send().await.unwrap();
        assert_eq!(r.version(), want);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    server.shutdown().await;
}
