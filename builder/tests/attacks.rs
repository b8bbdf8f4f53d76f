//! The attacker's tests: someone on the provisioning network, with nothing but what the network
//! gives, against a real `imgbuild serve` process on loopback, with requests made the way an
//! attacker makes them (curl, openssl, raw TLS and raw HTTP bytes), never through firstboot's
//! client. docs/security.md names each test next to the claim it proves.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use proto::wire::*;
use support::*;

const M1: &str = "52:54:00:03:01:11";
const W1: &str = "52:54:00:03:01:21";

/// The reference cluster's state and a real server process with `extra` options.
fn server(
    dir: &std::path::Path,
    edit: impl FnOnce(String) -> String,
    extra: &[&str],
) -> (imgbuild::state::State, ServeProcess) {
    let (st, _) = state_with(dir, edit);
    let serve = ServeProcess::start_with(&st.root, "127.0.0.1:0", None, extra);
    (st, serve)
}

fn addr(s: &ServeProcess) -> std::net::SocketAddr {
    s.url.trim_start_matches("https://").parse().unwrap()
}

fn pin(st: &imgbuild::state::State) -> proto::pin::CaPin {
    st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin()
}

/// `curl -sk` (no certificate checks: an attacker has no pin): status and body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new(require_tool("curl", "curl"))
        .args(["-sk", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn code_of(body: &str) -> ErrorCode {
    serde_json::from_str::<ErrorBody>(body).unwrap_or_else(|e| panic!("{e}: {body}")).code
}

/// Every credential of the state dir, as the text it would appear as.
fn secrets(st: &imgbuild::state::State) -> Vec<String> {
    st.tokens().unwrap().records.iter().map(|t| t.token.expose()).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Attack 1: the open endpoints hand out a master's token and a node's MAC. Now they hand out
/// where the server is and its pin, never a credential (HTTPS API and plain-HTTP iPXE scripts).
#[test]
fn open_endpoints_serve_no_credential() {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("out");
    std::fs::create_dir_all(&boot).unwrap();
    let (st, s) = server(dir.path(), |t| t, &["--boot-listen", "127.0.0.1:0", "--boot-dir", boot.to_str().unwrap()]);
    let mut bodies = Vec::new();
    for path in [
        "/v1/payload/role/master",
        "/v1/payload/role/worker",
        "/v1/payload/node/k8s-master1",
        "/v1/payload/node/k8s-worker1",
    ] {
        let (code, body) = curl(&[&format!("{}{path}", s.url)]);
        assert_eq!(code, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v.get("token").is_none(), "{path} served a credential: {body}");
        bodies.push(body);
    }
    // The boot listener's iPXE scripts, by role and by MAC.
    let boot_addr = wait_for("the boot listener in the log", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(st.root.join("serve.log")).ok()?;
        log.lines().find_map(|l| l.split("PXE boot files on http://").nth(1)?.split(' ').next().map(str::to_string))
    });
    for path in ["/boot/master.ipxe", "/boot/worker.ipxe", "/boot/mac/52-54-00-03-01-11.ipxe"] {
        let (code, body) = curl(&[&format!("http://{boot_addr}{path}")]);
        assert_eq!(code, 200, "{path}: {body}");
        bodies.push(body);
    }
    // PXE set files only, by their names (and the two images wrapped in cpio): no way out of
    // the bake's directory, encoded or not, wrapped or not.
    for path in [
        "/boot/worker/..%2F..%2Fstate%2Fsecrets%2Ftokens.json",
        "/boot/worker/..%2F..%2Fstate%2Fsecrets%2Ftokens.json.cpio",
        "/boot/worker/%2e%2e%2f%2e%2e%2fserve.log.cpio",
        "/boot/worker/../../serve.log",
        "/boot/worker/boot.ipxe.cpio",
        "/boot/etc/rootfs.erofs.cpio",
    ] {
        let (code, body) = curl(&["--path-as-is", &format!("http://{boot_addr}{path}")]);
        assert_eq!(code, 404, "{path}: {body}");
        bodies.push(body);
    }
    for secret in secrets(&st) {
        for b in &bodies {
            assert!(!b.contains(&secret), "an open endpoint carries a credential");
        }
    }
}

/// Attack 2: a certificate for k8s-master1 from its MAC and a key the attacker just made. With
/// no credential the machine only waits for approval; with the worker token or another node's
/// credential it is refused; the real master then enrolls with its own credential.
#[test]
fn a_mac_does_not_make_a_master() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    let now = time::OffsetDateTime::now_utc();
    let tokens = st.tokens().unwrap();
    let worker_token = tokens.enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    let m2_credential = tokens.node_credential("k8s-master2", now).unwrap().token.clone();
    let m1_credential = tokens.node_credential("k8s-master1", now).unwrap().token.clone();
    rt().block_on(async {
        let attacker = rcgen::KeyPair::generate().unwrap();
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c.enroll(None, &[M1], &attacker, None).await;
        assert_eq!(code, 200, "{body}");
        let r: EnrollResponse = serde_json::from_str(&body).unwrap();
        assert_eq!(r.status, EnrollStatus::Pending, "{body}");
        assert!(r.client_cert.is_none());
        // On that connection: still nobody.
        let (code, body) = c.call("GET", PATH_CONFIG, b"").await;
        assert_eq!((code, code_of(&body)), (401, ErrorCode::NotEnrolled), "{body}");
        for token in [&worker_token, &m2_credential] {
            let mut c = RawTls::open(addr(&s), pin(&st), None).await;
            let (code, body) = c.enroll(Some(token), &[M1], &attacker, None).await;
            assert_eq!((code, code_of(&body)), (403, ErrorCode::Refused), "{body}");
            assert!(!body.contains("k8s-master"), "the refusal names the inventory: {body}");
        }
        // The real master, with its own credential.
        let mut real = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = real.enroll(Some(&m1_credential), &[M1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
        let r: EnrollResponse = serde_json::from_str(&body).unwrap();
        assert_eq!(r.node.unwrap().name, "k8s-master1");
        let (code, body) = real.call("GET", PATH_CONFIG, b"").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("BEGIN PRIVATE KEY") || body.contains("BEGIN EC PRIVATE KEY"),
            "a master gets its CA keys"
        );
    });
    let nodes = s.nodes();
    let m1 = nodes.iter().find(|n| n.node.as_deref() == Some("k8s-master1")).unwrap();
    assert_eq!(m1.proof, Some(Proof::Credential));
}

/// Attack 3: a machine waiting for approval, or anybody else, asks for the master config with its
/// CA keys. Without a bound certificate there is no config.
#[test]
fn no_config_without_a_bound_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    let (code, body) = curl(&[&format!("{}{PATH_CONFIG}", s.url)]);
    assert_eq!((code, code_of(&body)), (401, ErrorCode::NotEnrolled), "{body}");
    // A client certificate from a CA of the attacker's, with the node's name: no handshake.
    let fake = rcgen::CertificateParams::new(vec!["k8s-master1".into()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = fake.self_signed(&key).unwrap();
    let (cf, kf) = (dir.path().join("fake.crt"), dir.path().join("fake.key"));
    std::fs::write(&cf, cert.pem()).unwrap();
    std::fs::write(&kf, key.serialize_pem()).unwrap();
    let (code, _) =
        curl(&["--cert", cf.to_str().unwrap(), "--key", kf.to_str().unwrap(), &format!("{}{PATH_CONFIG}", s.url)]);
    assert_eq!(code, 0, "a self-made client certificate got an answer");
    let _ = st;
}

/// Attack 4: an admin certificate from `/v1/sign`, or any `system:masters` certificate of the
/// cluster CA, as the server's admin. Neither is: the server's operator is the enrollment CA's
/// `imgbuild:admins` identity of the state dir, and a worker gets no admin certificate.
#[test]
fn cluster_admin_certificates_are_not_the_servers_admin() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    // admin.conf's certificate (cluster CA, O=system:masters).
    let kc: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(st.admin_kubeconfig()).unwrap()).unwrap();
    use base64::Engine;
    let b64 =
        |p: &str| base64::engine::general_purpose::STANDARD.decode(kc.pointer(p).unwrap().as_str().unwrap()).unwrap();
    let (cf, kf) = (dir.path().join("admin.crt"), dir.path().join("admin.key"));
    std::fs::write(&cf, b64("/users/0/user/client-certificate-data")).unwrap();
    std::fs::write(&kf, b64("/users/0/user/client-key-data")).unwrap();
    let (code, body) =
        curl(&["--cert", cf.to_str().unwrap(), "--key", kf.to_str().unwrap(), &format!("{}{PATH_NODES}", s.url)]);
    assert_ne!(code, 200, "a cluster-CA admin certificate listed the fleet: {body}");
    // The state dir's admin identity does.
    let (code, body) = curl(&[
        "--cert",
        st.serve_admin_cert().to_str().unwrap(),
        "--key",
        st.serve_admin_key().to_str().unwrap(),
        &format!("{}{PATH_NODES}", s.url),
    ]);
    assert_eq!(code, 200, "{body}");
    // A worker asks /v1/sign for an admin certificate.
    let now = time::OffsetDateTime::now_utc();
    let worker_token = st.tokens().unwrap().enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    rt().block_on(async {
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c.enroll(Some(&worker_token), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
        let csr = firstboot::agent::csr(&rcgen::KeyPair::generate().unwrap(), None).unwrap();
        let req = SignRequest { csrs: vec![CsrRequest { purpose: CertPurpose::Admin, csr }] };
        let (code, body) = c.call("POST", PATH_SIGN, &serde_json::to_vec(&req).unwrap()).await;
        assert_eq!((code, code_of(&body)), (403, ErrorCode::CsrRefused), "{body}");
        // And the node's own certificate is no admin either.
        let (code, body) = c.call("GET", PATH_NODES, b"").await;
        assert_eq!(code, 401, "{body}");
    });
}

/// A CSR captured from one connection, replayed on another without its key: refused. So is a
/// CSR that carries no channel binding.
#[test]
fn a_captured_csr_is_worthless_on_another_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    let now = time::OffsetDateTime::now_utc();
    let credential = st.tokens().unwrap().node_credential("k8s-worker1", now).unwrap().token.clone();
    rt().block_on(async {
        let key = rcgen::KeyPair::generate().unwrap();
        let victim = RawTls::open(addr(&s), pin(&st), None).await;
        let captured = firstboot::agent::csr(&key, Some(&victim.binding())).unwrap();
        let mut attacker = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = attacker.enroll(Some(&credential), &[W1], &key, Some(captured)).await;
        assert_eq!((code, code_of(&body)), (403, ErrorCode::CsrRefused), "{body}");
        assert!(body.contains("bound to another TLS connection"), "{body}");
        let unbound = firstboot::agent::csr(&key, None).unwrap();
        let (code, body) = attacker.enroll(Some(&credential), &[W1], &key, Some(unbound)).await;
        assert_eq!((code, code_of(&body)), (403, ErrorCode::CsrRefused), "{body}");
        let (code, body) = attacker.call("GET", PATH_CONFIG, b"").await;
        assert_eq!(code, 401, "{body}");
    });
}

/// A bound node is never re-bound: a second key is refused and shown as a conflict, until the
/// operator resets the node; a revoked node's certificate is refused at its next request.
#[test]
fn rebinding_takes_the_operator_and_revocation_is_immediate() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    let now = time::OffsetDateTime::now_utc();
    let worker_token = st.tokens().unwrap().enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    let imgbuild = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_imgbuild"))
            .args(["--state", st.root.to_str().unwrap(), "nodes", "--server", &s.url])
            .args(args)
            .output()
            .unwrap()
    };
    rt().block_on(async {
        let mut first = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = first.enroll(Some(&worker_token), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
        let mut second = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = second.enroll(Some(&worker_token), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!((code, code_of(&body)), (403, ErrorCode::Refused), "{body}");
        assert_eq!(first.call("GET", PATH_CONFIG, b"").await.0, 200, "the bound key lost its node");

        let nodes = s.nodes();
        let w1 = nodes.iter().find(|n| n.node.as_deref() == Some("k8s-worker1")).unwrap();
        assert_eq!(w1.conflicts.len(), 1, "{w1:?}");

        // Revoked: the next request of that certificate (on its own connection) is refused.
        let o = imgbuild(&["revoke", "k8s-worker1"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (code, body) = first.call("GET", PATH_CONFIG, b"").await;
        assert_eq!((code, code_of(&body)), (401, ErrorCode::Revoked), "{body}");

        // Reset: the node is free again, and a new credential exists for it.
        let o = imgbuild(&["reset", "k8s-worker1"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let fresh =
            st.tokens().unwrap().node_credential("k8s-worker1", time::OffsetDateTime::now_utc()).unwrap().token.clone();
        let mut third = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = third.enroll(Some(&fresh), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
    });
}

/// Approval binds the key the operator approved, as the role the operator decided: another key,
/// or a credential of another role, does not ride on it.
#[test]
fn approval_is_for_one_key_and_one_role() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t.replace("policy: known-only", "policy: approve"), &[]);
    let stranger = "52:54:00:aa:bb:01";
    let now = time::OffsetDateTime::now_utc();
    let m1_credential = st.tokens().unwrap().node_credential("k8s-master1", now).unwrap().token.clone();
    rt().block_on(async {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c.enroll(None, &[stranger], &key, None).await;
        assert_eq!(code, 200, "{body}");
        let fingerprint =
            imgbuild::serve::fleet::records::key_fingerprint(&rcgen::PublicKeyData::subject_public_key_info(&key));
        let o = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
            .args(["--state", st.root.to_str().unwrap(), "nodes", "--server", &s.url, "approve", stranger])
            .args(["--key", &fingerprint])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Another key for that machine: refused.
        let mut other = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = other.enroll(None, &[stranger], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!((code, code_of(&body)), (403, ErrorCode::Refused), "{body}");
        // The approved key with a master's credential: refused (approved as a worker).
        let mut c2 = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c2.enroll(Some(&m1_credential), &[stranger], &key, None).await;
        assert_eq!(code, 403, "{body}");
        // The approved key: bound.
        let mut c3 = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c3.enroll(None, &[stranger], &key, None).await;
        assert_eq!(code, 200, "{body}");
        let r: EnrollResponse = serde_json::from_str(&body).unwrap();
        assert_eq!(r.status, EnrollStatus::Enrolled, "{body}");
        assert_eq!(r.node.unwrap().role, proto::Role::Worker);
    });
    let nodes = s.nodes();
    assert!(nodes.iter().any(|n| n.proof == Some(Proof::Approved)), "{nodes:?}");
}

/// Machines without a credential cost an attacker nothing to invent: the server keeps at most
/// 16 of them waiting per source (and 1024 in all).
#[test]
fn invented_machines_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t.replace("policy: known-only", "policy: approve"), &[]);
    rt().block_on(async {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut codes = Vec::new();
        for i in 0..18 {
            let mut c = RawTls::open(addr(&s), pin(&st), None).await;
            let mac = format!("52:54:00:bb:00:{i:02x}");
            let (code, _) = c.enroll(None, &[&mac], &key, None).await;
            codes.push(code);
        }
        assert_eq!(&codes[..16], &[200; 16], "{codes:?}");
        assert_eq!(&codes[16..], &[429, 429], "{codes:?}");
    });
}

/// The approval queue's count (which caps invented machines in all) moves only for machines that
/// were queued: enrollments of other machines leave it alone. They once decremented it, lifting
/// the cap by one per enrollment, and made every enrollment conflict with every other on that key.
#[test]
fn enrollments_leave_the_approval_queue_count_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t.replace("policy: known-only", "policy: auto-worker"), &[]);
    let now = time::OffsetDateTime::now_utc();
    let worker_token = st.tokens().unwrap().enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    rt().block_on(async {
        let key = rcgen::KeyPair::generate().unwrap();
        for i in 0..2 {
            let mut c = RawTls::open(addr(&s), pin(&st), None).await;
            let (code, body) = c.enroll(None, &[&format!("52:54:00:cc:00:{i:02x}")], &key, None).await;
            assert_eq!((code, code_of_status(&body)), (200, Some(EnrollStatus::Pending)), "{body}");
        }
        for i in 0..3 {
            let mut c = RawTls::open(addr(&s), pin(&st), None).await;
            let mac = format!("52:54:00:cd:00:{i:02x}");
            let (code, body) = c.enroll(Some(&worker_token), &[&mac], &rcgen::KeyPair::generate().unwrap(), None).await;
            assert_eq!((code, code_of_status(&body)), (200, Some(EnrollStatus::Enrolled)), "{body}");
        }
    });
    s.kill9();
    let store = imgbuild::serve::store::RedbStore::open(&st.store_dir().join("fleet.redb")).unwrap();
    let count: u64 = serde_json::from_slice(&store.get("pending-count").unwrap().unwrap().value).unwrap();
    assert_eq!(count, 2, "two machines wait; three others enrolled");
}

/// The status of an enrollment response body.
fn code_of_status(body: &str) -> Option<EnrollStatus> {
    serde_json::from_str::<EnrollResponse>(body).ok().map(|r| r.status)
}

/// A raw TCP connection to the server's port.
fn tcp(s: &ServeProcess) -> TcpStream {
    let c = TcpStream::connect(addr(s)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}

/// Whether the server closed the connection (a read gives EOF or a reset).
fn closed(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(c.read(&mut buf), Ok(0) | Err(_))
}

/// No timeouts after the handshake, and no cap: idle connections, trickled headers and slow
/// bodies stayed open forever. Now each has its limit, and connections over the cap are closed.
#[test]
fn slow_and_idle_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(
        dir.path(),
        |t| t,
        &["--header-timeout", "2", "--request-timeout", "2", "--idle-timeout", "4", "--max-connections", "8"],
    );
    // An idle TCP connection: no TLS handshake ever (10 s), closed.
    let start = Instant::now();
    assert!(closed(&mut tcp(&s)), "an idle connection stayed open");
    assert!(start.elapsed() < Duration::from_secs(25), "{:?}", start.elapsed());
    rt().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Headers trickled a byte a second after the handshake: closed within the header limit.
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let start = Instant::now();
        let mut cut = false;
        for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if c.0.write_all(&[*b]).await.is_err() {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
            if start.elapsed() > Duration::from_secs(8) {
                break;
            }
        }
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), c.0.read(&mut buf)).await;
        cut |= matches!(read, Ok(Ok(0)) | Ok(Err(_)) | Ok(Ok(_)));
        assert!(cut, "trickled headers kept the connection");
        assert!(start.elapsed() < Duration::from_secs(12), "{:?}", start.elapsed());

        // A body that never comes: 408 (or closed) within the request limit.
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        c.0.write_all(b"POST /v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{").await.unwrap();
        let start = Instant::now();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), c.0.read(&mut buf)).await.unwrap().unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(start.elapsed() < Duration::from_secs(8), "{:?}", start.elapsed());

        // An idle TLS connection after a request: closed after the idle limit.
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        assert_eq!(c.call("GET", PATH_HEALTH, b"").await.0, 200);
        let n = tokio::time::timeout(Duration::from_secs(10), c.0.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "an idle connection stayed open");
    });
    // Over the cap: the connection is closed at once, while 8 others are open.
    let _held: Vec<TcpStream> = (0..8).map(|_| tcp(&s)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = tcp(&s);
    let start = Instant::now();
    assert!(closed(&mut extra), "a connection over the cap was served");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}

/// Reports of 2 MB grew the store by 151 MB; identities of any size were taken. Now both are
/// bounded, and so is every body.
#[test]
fn oversized_inputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    let now = time::OffsetDateTime::now_utc();
    let worker_token = st.tokens().unwrap().enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    rt().block_on(async {
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c.enroll(Some(&worker_token), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
        let t = time::OffsetDateTime::now_utc();
        let report = Report {
            phase: Phase::Join,
            status: PhaseStatus::Failed,
            message: "x".repeat(5000),
            code: None,
            started_at: t,
            at: t,
            boot_id: None,
        };
        let (code, body) = c.call("POST", PATH_REPORT, &serde_json::to_vec(&report).unwrap()).await;
        assert_eq!((code, code_of(&body)), (413, ErrorCode::TooLarge), "{body}");
        // 200 KiB: refused by its length; the server may close before the client sent it all
        // (then the answer can be lost with the connection's reset).
        let huge = vec![b' '; 200 << 10];
        let (code, body) = c.call("POST", PATH_REPORT, &huge).await;
        assert!(code == 413 || code == 0, "{code} {body}");
        let macs: Vec<String> = (0..100).map(|i| format!("52:54:00:cc:00:{i:02x}")).collect();
        let macs: Vec<&str> = macs.iter().map(String::as_str).collect();
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c.enroll(Some(&worker_token), &macs, &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!((code, code_of(&body)), (413, ErrorCode::TooLarge), "{body}");
    });
    let db = st.store_dir().join("fleet.redb");
    assert!(
        std::fs::metadata(&db).unwrap().len() < 8 << 20,
        "the store grew to {} bytes",
        std::fs::metadata(&db).unwrap().len()
    );
}

/// `/metrics` is open: it says how many machines are where, and nothing about which. It does
/// not read the store per scrape (the gauges are at most 15 s old).
#[test]
fn metrics_are_counts_only_and_cheap() {
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    let now = time::OffsetDateTime::now_utc();
    let worker_token = st.tokens().unwrap().enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    let (code, first) = curl(&[&format!("{}{PATH_METRICS}", s.url)]);
    assert_eq!(code, 200, "{first}");
    rt().block_on(async {
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c.enroll(Some(&worker_token), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
    });
    let (_, second) = curl(&[&format!("{}{PATH_METRICS}", s.url)]);
    assert!(second.contains("imgbuild_enrollments_total 1"), "{second}");
    let gauge = |t: &str| t.lines().filter(|l| l.starts_with("imgbuild_machines{")).collect::<Vec<_>>().join("\n");
    assert_eq!(gauge(&first), gauge(&second), "the gauges were read from the store again within 15 s");
    for text in [&first, &second] {
        assert!(!text.contains("k8s-") && !text.contains("52:54"), "metrics name machines: {text}");
    }
}

/// The store and the audit log are the operator's alone, and every change's audit record is in
/// the store with the change.
#[test]
fn store_and_audit_are_private_and_the_audit_is_durable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (st, s) = server(dir.path(), |t| t, &[]);
    let now = time::OffsetDateTime::now_utc();
    let worker_token = st.tokens().unwrap().enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    rt().block_on(async {
        let mut c = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = c.enroll(Some(&worker_token), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
    });
    s.kill9();
    for f in [st.store_dir().join("fleet.redb"), st.root.join("audit.log"), st.serve_admin_key()] {
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
    }
    let store = imgbuild::serve::store::RedbStore::open(&st.store_dir().join("fleet.redb")).unwrap();
    let audit: Vec<String> =
        store.list("audit/").unwrap().into_iter().map(|(_, e)| String::from_utf8(e.value).unwrap()).collect();
    assert!(
        audit
            .iter()
            .any(|l| l.contains("\"event\":\"enrolled\"") && l.contains("k8s-worker1") && l.contains("worker-token")),
        "{audit:?}"
    );
}

/// What a PXE machine reads over plain HTTP carries nothing secret; firstboot refuses a payload
/// that would make it send a credential in clear, and http:// enrollment servers.
#[test]
fn firstboot_refuses_cleartext_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    let cluster = st.cluster().unwrap();
    let mut cfg = imgbuild::payload::boot_config(
        &st,
        &cluster,
        &imgbuild::payload::Target { role: proto::Role::Worker, node: None },
    )
    .unwrap();
    cfg.servers = vec!["http://127.0.0.1:9443".into()];
    let root = node_root(&dir.path().join("node"), W1);
    let file = root.join("payload.json");
    std::fs::write(&file, serde_json::to_string(&cfg).unwrap()).unwrap();
    let mut o = firstboot::agent::Options::new(&root);
    o.config = Some(file);
    o.join = false;
    o.deadline = Duration::from_secs(5);
    let rec = firstboot::agent::host::Recorder::default;
    let mut agent = firstboot::agent::Agent::new(o, rec(), rec()).unwrap();
    let e = rt().block_on(agent.run()).unwrap_err().to_string();
    assert!(e.contains("is not an https:// URL"), "{e}");
}

/// Bad inputs, each refused with its code: the rows of docs/security.md's table that are
/// requests.
#[test]
fn bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    // Every row fails on purpose: the limit on failures per source would answer 429 first.
    let (st, s) = server(dir.path(), |t| t, &["--failures-per-minute", "1000"]);
    let now = time::OffsetDateTime::now_utc();
    let tokens = st.tokens().unwrap();
    let worker_token = tokens.enrollment_token(proto::Role::Worker, now).unwrap().token.clone();
    let key = rcgen::KeyPair::generate().unwrap();
    rt().block_on(async {
        // (row, body maker, status, code): the body is made for the connection it goes on.
        type Maker = Box<dyn Fn(&str) -> Vec<u8>>;
        type Edit = Box<dyn Fn(&mut serde_json::Value, &str)>;
        let enroll_with = |f: Edit| -> Maker {
            let (token, key) = (worker_token.clone(), key.serialize_pem());
            Box::new(move |binding| {
                let key = rcgen::KeyPair::from_pem(&key).unwrap();
                let mut v = serde_json::json!({
                    "protocol": PROTOCOL_VERSION,
                    "token": token.expose(),
                    "identity": {"macs": [W1]},
                    "csr": firstboot::agent::csr(&key, Some(binding)).unwrap(),
                });
                f(&mut v, binding);
                serde_json::to_vec(&v).unwrap()
            })
        };
        let raw = |b: &'static [u8]| -> Maker { Box::new(move |_| b.to_vec()) };
        let csr_with = |edit: fn(&mut rcgen::CertificateParams)| -> Edit {
            Box::new(move |v, binding| {
                let k = rcgen::KeyPair::generate().unwrap();
                let mut p = rcgen::CertificateParams::default();
                p.distinguished_name = rcgen::DistinguishedName::new();
                edit(&mut p);
                let attr = {
                    let mut values = vec![0x31, (binding.len() + 2) as u8, 0x0c, binding.len() as u8];
                    values.extend_from_slice(binding.as_bytes());
                    rcgen::Attribute { oid: &[1, 2, 840, 113549, 1, 9, 7], values }
                };
                v["csr"] = p.serialize_request_with_attributes(&k, vec![attr]).unwrap().pem().unwrap().into();
            })
        };
        let cases: Vec<(&str, Maker, u16, ErrorCode)> = vec![
            ("body is not JSON", raw(b"not json"), 400, ErrorCode::BadRequest),
            ("body is JSON of another shape", raw(b"[1,2,3]"), 400, ErrorCode::BadRequest),
            ("unknown field", enroll_with(Box::new(|v, _| v["admin"] = true.into())), 400, ErrorCode::BadRequest),
            ("protocol 1", enroll_with(Box::new(|v, _| v["protocol"] = 1.into())), 400, ErrorCode::UnsupportedProtocol),
            ("protocol 99", enroll_with(Box::new(|v, _| v["protocol"] = 99.into())), 400, ErrorCode::UnsupportedProtocol),
            ("empty identity", enroll_with(Box::new(|v, _| v["identity"] = serde_json::json!({"macs": []}))), 400, ErrorCode::BadRequest),
            ("MAC that is not one", enroll_with(Box::new(|v, _| v["identity"]["macs"] = serde_json::json!(["52:54:00:zz:00:01"]))), 400, ErrorCode::BadRequest),
            ("MAC of 5 bytes", enroll_with(Box::new(|v, _| v["identity"]["macs"] = serde_json::json!(["52:54:00:00:01"]))), 400, ErrorCode::BadRequest),
            ("17 MACs", enroll_with(Box::new(|v, _| v["identity"]["macs"] = (0..17).map(|i| format!("52:54:00:dd:00:{i:02x}")).collect::<Vec<_>>().into())), 413, ErrorCode::TooLarge),
            ("UUID of 65 characters", enroll_with(Box::new(|v, _| v["identity"]["uuid"] = "a".repeat(65).into())), 413, ErrorCode::TooLarge),
            ("serial with a control character", enroll_with(Box::new(|v, _| v["identity"]["serial"] = "abc\u{1b}[2J".into())), 413, ErrorCode::TooLarge),
            ("token not of the format", enroll_with(Box::new(|v, _| v["token"] = "abc".into())), 400, ErrorCode::BadRequest),
            ("token with upper case", enroll_with(Box::new(|v, _| v["token"] = "ABCDEF.0123456789abcdef".into())), 400, ErrorCode::BadRequest),
            ("unknown token", enroll_with(Box::new(|v, _| v["token"] = "zzzzzz.zzzzzzzzzzzzzzzz".into())), 401, ErrorCode::InvalidToken),
            ("CSR that is not PEM", enroll_with(Box::new(|v, _| v["csr"] = "garbage".into())), 403, ErrorCode::CsrRefused),
            ("CSR PEM of a certificate", enroll_with(Box::new(|v, _| {
                let k = rcgen::KeyPair::generate().unwrap();
                v["csr"] = rcgen::CertificateParams::default().self_signed(&k).unwrap().pem().into();
            })), 403, ErrorCode::CsrRefused),
            ("CSR with a broken signature", enroll_with(Box::new(|v, _| {
                let pem = v["csr"].as_str().unwrap().to_string();
                let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
                let mut der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body).unwrap();
                let n = der.len();
                der[n - 5] ^= 0x55;
                let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
                v["csr"] = format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n").into();
            })), 403, ErrorCode::CsrRefused),
            ("CSR without channel binding", enroll_with(Box::new(|v, _| {
                v["csr"] = firstboot::agent::csr(&rcgen::KeyPair::generate().unwrap(), None).unwrap().into();
            })), 403, ErrorCode::CsrRefused),
            ("CSR bound to another connection", enroll_with(Box::new(|v, _| {
                let other = proto::wire::channel_binding_text(&[7u8; 32]);
                v["csr"] = firstboot::agent::csr(&rcgen::KeyPair::generate().unwrap(), Some(&other)).unwrap().into();
            })), 403, ErrorCode::CsrRefused),
            ("CSR asking for a CN", enroll_with(csr_with(|p| p.distinguished_name.push(rcgen::DnType::CommonName, "k8s-master1"))), 403, ErrorCode::CsrRefused),
            ("CSR asking for system:masters", enroll_with(csr_with(|p| p.distinguished_name.push(rcgen::DnType::OrganizationName, "system:masters"))), 403, ErrorCode::CsrRefused),
            ("CSR asking for a SAN", enroll_with(csr_with(|p| p.subject_alt_names = vec![rcgen::SanType::DnsName("kubernetes".try_into().unwrap())])), 403, ErrorCode::CsrRefused),
            ("CSR asking to be a CA", enroll_with(csr_with(|p| p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign])), 403, ErrorCode::CsrRefused),
            ("CSR asking for serverAuth", enroll_with(csr_with(|p| p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth])), 403, ErrorCode::CsrRefused),
            ("worker token on a master's MAC", enroll_with(Box::new(|v, _| v["identity"]["macs"] = serde_json::json!([M1]))), 403, ErrorCode::Refused),
            ("worker token on a MAC outside the inventory", enroll_with(Box::new(|v, _| v["identity"]["macs"] = serde_json::json!(["52:54:00:ee:ee:ee"]))), 403, ErrorCode::Refused),
        ];
        let rows = cases.len();
        for (row, make, status, code) in cases {
            let mut c = RawTls::open(addr(&s), pin(&st), None).await;
            let body = make(&c.binding());
            let (got, answer) = c.call("POST", PATH_ENROLL, &body).await;
            assert_eq!((got, code_of(&answer)), (status, code), "{row}: {answer}");
        }
        // Calls that need a node, the operator or a path.
        let admin = (st.serve_admin_cert(), st.serve_admin_key());
        let admin_pem = (std::fs::read_to_string(&admin.0).unwrap(), std::fs::read_to_string(&admin.1).unwrap());
        let mut op = RawTls::open(addr(&s), pin(&st), Some((&admin_pem.0, &admin_pem.1))).await;
        let operator_cases: Vec<(&str, &str, &[u8], u16)> = vec![
            ("approve a machine that never asked", PATH_NODES_APPROVE, br#"{"machine":"52:54:00:00:00:99"}"#, 400),
            ("approve with an unknown field", PATH_NODES_APPROVE, br#"{"machine":"x","force":true}"#, 400),
            ("reset a node that is not bound", PATH_NODES_RESET, br#"{"node":"k8s-worker3"}"#, 400),
            ("revoke with neither node nor token", PATH_NODES_REVOKE, b"{}", 400),
            ("revoke with both node and token", PATH_NODES_REVOKE, br#"{"node":"a","token":"abcdef"}"#, 400),
        ];
        for (row, path, body, status) in &operator_cases {
            let (got, answer) = op.call("POST", path, body).await;
            assert_eq!(got, *status, "{row}: {answer}");
        }
        let mut anon = RawTls::open(addr(&s), pin(&st), None).await;
        let anonymous_cases: Vec<(&str, &str, &str, u16)> = vec![
            ("list nodes without the admin identity", "GET", PATH_NODES, 401),
            ("approve without the admin identity", "POST", PATH_NODES_APPROVE, 401),
            ("reset without the admin identity", "POST", PATH_NODES_RESET, 401),
            ("revoke without the admin identity", "POST", PATH_NODES_REVOKE, 401),
            ("report without a certificate", "POST", PATH_REPORT, 401),
            ("sign without a certificate", "POST", PATH_SIGN, 401),
            ("lease without a certificate", "POST", PATH_BOOTSTRAP_LEASE, 401),
            ("a path that does not exist", "GET", "/v1/secrets", 404),
            ("the payload of an unknown role", "GET", "/v1/payload/role/admin", 400),
        ];
        for (row, method, path, status) in &anonymous_cases {
            let body: &[u8] = if *method == "POST" { b"{}" } else { b"" };
            let (got, answer) = anon.call(method, path, body).await;
            assert_eq!(got, *status, "{row}: {answer}");
        }
        // A worker's own calls beyond its role.
        let mut w = RawTls::open(addr(&s), pin(&st), None).await;
        let (code, body) = w.enroll(Some(&worker_token), &[W1], &rcgen::KeyPair::generate().unwrap(), None).await;
        assert_eq!(code, 200, "{body}");
        let worker_cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
            ("a worker takes the bootstrap lease", PATH_BOOTSTRAP_LEASE, br#"{"action":"acquire"}"#.to_vec(), 400),
            ("a report of an unknown phase", PATH_REPORT, br#"{"phase":"pwn","status":"succeeded","message":"","startedAt":"2026-01-01T00:00:00Z","at":"2026-01-01T00:00:00Z"}"#.to_vec(), 400),
            ("a sign request for an unknown purpose", PATH_SIGN, br#"{"csrs":[{"purpose":"root-ca","csr":"x"}]}"#.to_vec(), 400),
            ("a sign request for the apiserver", PATH_SIGN, serde_json::to_vec(&SignRequest { csrs: vec![CsrRequest { purpose: CertPurpose::Apiserver, csr: firstboot::agent::csr(&key, None).unwrap() }] }).unwrap(), 403),
            ("a sign request for etcd", PATH_SIGN, serde_json::to_vec(&SignRequest { csrs: vec![CsrRequest { purpose: CertPurpose::EtcdServer, csr: firstboot::agent::csr(&key, None).unwrap() }] }).unwrap(), 403),
        ];
        for (row, path, body, status) in &worker_cases {
            let (got, answer) = w.call("POST", path, body).await;
            assert_eq!(got, *status, "{row}: {answer}");
        }
        let total = rows + operator_cases.len() + anonymous_cases.len() + worker_cases.len();
        assert!(total >= 40, "{total} rows");
    });
}
