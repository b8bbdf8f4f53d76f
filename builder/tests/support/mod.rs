//! Helpers shared by the integration tests: locating real tools, free loopback ports, process
//! guards, real etcd members and a real control plane ([`control_plane`]). A missing tool fails
//! the test with the package to install; CI installs everything with `.ci/setup-host`.
#![allow(dead_code)]

pub mod control_plane;
pub mod sim;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Where `.ci/setup-host` puts the host tools it unpacks instead of installing (etcd, etcdctl,
/// cloud-init): their services never reach the host.
pub fn host_tools_dir() -> PathBuf {
    cache_dir().join("tools/bin")
}

/// imgbuild's cache (`IMGBUILD_CACHE`, else `/var/cache/imgbuild`), as `.ci/setup-host` fills it.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("IMGBUILD_CACHE").map_or_else(|| PathBuf::from("/var/cache/imgbuild"), PathBuf::from)
}

/// A host tool from PATH or [`host_tools_dir`]; panics with what provides it when neither has it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([host_tools_dir()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not found: run .ci/setup-host (it provides {package})"))
}

/// A free TCP port on 127.0.0.1 (the listener is closed again; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills and reaps the process when dropped.
pub struct ChildGuard(pub Child, pub String);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 200 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `sha256:` pin of a CA certificate computed with openssl, kubeadm's documented recipe.
pub fn openssl_pin(ca_crt: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -pubkey -in '{}' -noout | openssl pkey -pubin -outform der | sha256sum",
            ca_crt.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    format!("sha256:{}", String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap())
}

/// A cluster state dir made from the reference manifest with `edit` applied to its text.
pub fn state_with(
    dir: &Path,
    edit: impl FnOnce(String) -> String,
) -> (imgbuild::state::State, imgbuild::cluster::Cluster) {
    let text = edit(imgbuild::cluster::DEFAULT_MANIFEST.to_string());
    let cluster = imgbuild::cluster::Cluster::parse(&text, "test.yaml").unwrap();
    let st = imgbuild::state::State::new(dir.join("state"));
    imgbuild::state::init(&st, &cluster, &[]).unwrap();
    (st, cluster)
}

/// A node's tree for firstboot `--root`: sysfs with one NIC of this MAC, and /etc/passwd.
pub fn node_root(dir: &Path, mac: &str) -> PathBuf {
    let root = dir.to_path_buf();
    let nic = root.join("sys/class/net/eth0");
    std::fs::create_dir_all(&nic).unwrap();
    std::fs::write(nic.join("address"), format!("{mac}\n")).unwrap();
    std::fs::write(nic.join("type"), "1\n").unwrap();
    std::fs::write(nic.join("addr_assign_type"), "0\n").unwrap();
    image_accounts(&root);
    root
}

/// /etc/passwd and /etc/group under `root` with the users and groups the images' packages make,
/// which node configs name as owners.
pub fn image_accounts(root: &Path) {
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\netcd:x:107:113::/var/lib/etcd:/usr/sbin/nologin\n\
         bird:x:108:114:BIRD Internet Routing Daemon:/run/bird:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\netcd:x:113:\nbird:x:114:\n").unwrap();
}

/// The payload `imgbuild payload --role ROLE` hands out (a worker's carries the worker token,
/// a master's none), pointing at `server`.
pub fn payload(st: &imgbuild::state::State, role: proto::Role, server: &str) -> proto::bootcfg::BootConfig {
    let cluster = st.cluster().unwrap();
    let target = imgbuild::payload::Target { role, node: None };
    let cfg = imgbuild::payload::boot_config(st, &cluster, &target).unwrap();
    proto::bootcfg::BootConfig { servers: vec![server.to_string()], ..cfg }
}

/// The payload of inventory node `name` (`imgbuild payload --node NAME`): its own credential.
pub fn node_payload(st: &imgbuild::state::State, name: &str, server: &str) -> proto::bootcfg::BootConfig {
    let cluster = st.cluster().unwrap();
    let node = cluster.node(name).unwrap();
    let target = imgbuild::payload::Target { role: node.role, node: Some(node) };
    let cfg = imgbuild::payload::boot_config(st, &cluster, &target).unwrap();
    // The tests' machines have no NIC to configure.
    proto::bootcfg::BootConfig { servers: vec![server.to_string()], network: None, ..cfg }
}

/// One TLS 1.3 connection to `imgbuild serve`, written to byte by byte as an attacker (or a
/// careful test) would: raw HTTP/1.1, the connection's own channel binding at hand.
pub struct RawTls(pub tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

impl RawTls {
    /// A connection that trusts the server under `pin`, presenting `client` (cert, key) if given.
    pub async fn open(addr: std::net::SocketAddr, pin: proto::pin::CaPin, client: Option<(&str, &str)>) -> Self {
        let identity = proto::tls::ClientIdentity::from_pem(client).unwrap();
        let cfg = proto::tls::pinned_client_config(pin, identity).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        RawTls(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap())
    }

    /// This connection's RFC 9266 channel binding, as a CSR must carry it.
    pub fn binding(&self) -> String {
        let mut out = [0u8; proto::wire::CHANNEL_BINDING_LEN];
        self.0.get_ref().1.export_keying_material(&mut out, proto::wire::CHANNEL_BINDING_LABEL, None).unwrap();
        proto::wire::channel_binding_text(&out)
    }

    /// Status and body of one request. A server may answer and close before it read all of a
    /// body it refuses: a failed write still reads the answer, and a connection closed with no
    /// answer at all is status 0.
    pub async fn call(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let sent = async {
            self.0.write_all(&[head.as_bytes(), body].concat()).await?;
            self.0.flush().await
        }
        .await;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            match self.0.read_u8().await {
                Ok(b) => head.push(b),
                Err(e) if sent.is_err() => return (0, format!("closed while sending ({sent:?}), then {e}")),
                Err(e) => panic!("reading the answer: {e}"),
            }
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

    /// `POST /v1/enroll` of this request, its CSR made for this connection unless `csr` is given.
    pub async fn enroll(
        &mut self,
        token: Option<&proto::BootstrapToken>,
        macs: &[&str],
        key: &rcgen::KeyPair,
        csr: Option<String>,
    ) -> (u16, String) {
        let csr = csr.unwrap_or_else(|| firstboot::agent::csr(key, Some(&self.binding())).unwrap());
        let req = proto::wire::EnrollRequest {
            protocol: proto::wire::PROTOCOL_VERSION,
            token: token.cloned(),
            identity: proto::wire::MachineIdentity {
                uuid: None,
                serial: None,
                macs: macs.iter().map(|m| m.to_string()).collect(),
            },
            image: None,
            csr,
        };
        self.call("POST", proto::wire::PATH_ENROLL, &serde_json::to_vec(&req).unwrap()).await
    }
}

/// Path of a workspace binary, built (or found up to date) by cargo once per test process: a binary
/// left in the target directory by an older checkout must never stand in for the current sources.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let mut built = BUILT.lock().unwrap();
    if !built.iter().any(|b| b == name) {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--locked", "--bin", name]).current_dir(workspace_root());
        if dir.ends_with("release") {
            cargo.arg("--release");
        }
        let st = cargo.status().unwrap();
        assert!(st.success(), "cargo build --bin {name}");
        built.push(name.to_string());
    }
    dir.join(name)
}

/// `imgbuild serve` as a process (optionally inside a network namespace); killed on drop.
pub struct ServeProcess {
    pub guard: ChildGuard,
    pub url: String,
    pub state: PathBuf,
}

impl ServeProcess {
    pub fn start(state: &Path, listen: &str, netns: Option<&str>) -> ServeProcess {
        Self::start_with(state, listen, netns, &[])
    }

    /// With more `imgbuild serve` options (limits, the boot listener).
    pub fn start_with(state: &Path, listen: &str, netns: Option<&str>, extra: &[&str]) -> ServeProcess {
        let _ = std::fs::remove_file(state.join("serve.json"));
        let imgbuild = env!("CARGO_BIN_EXE_imgbuild");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, imgbuild]);
                c
            }
            None => Command::new(imgbuild),
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(state.join("serve.log")).unwrap();
        let child = cmd
            .args(["--state", state.to_str().unwrap(), "serve", "--listen", listen])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let guard = ChildGuard(child, "imgbuild serve".into());
        let run = wait_for("imgbuild serve to listen", Duration::from_secs(30), || {
            std::fs::read(state.join("serve.json")).ok()
        });
        let run: serde_json::Value = serde_json::from_slice(&run).unwrap();
        let addr: std::net::SocketAddr = run["listen"].as_str().unwrap().parse().unwrap();
        ServeProcess { guard, url: format!("https://{addr}"), state: state.to_path_buf() }
    }

    /// `imgbuild nodes --json` against this server.
    pub fn nodes(&self) -> Vec<proto::wire::NodeStatus> {
        let out = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
            .args(["--state", self.state.to_str().unwrap(), "nodes", "--json", "--server", &self.url])
            .output()
            .unwrap();
        assert!(out.status.success(), "imgbuild nodes: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn kill9(mut self) {
        let _ = self.guard.0.kill();
        let _ = self.guard.0.wait();
    }
}

/// Real etcd members (Debian's etcd-server) on loopback with TLS from the state's etcd CA,
/// client-certificate auth on, and a client certificate for talking to them.
pub struct EtcdCluster {
    pub guards: Vec<ChildGuard>,
    pub endpoints: Vec<String>,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub dir: PathBuf,
    pub names: Vec<String>,
}

impl EtcdCluster {
    /// Starts the cluster's etcd members (`members` of them), all on 127.0.0.1.
    pub fn start(
        dir: &Path,
        st: &imgbuild::state::State,
        cluster: &imgbuild::cluster::Cluster,
        members: usize,
    ) -> EtcdCluster {
        use imgbuild::pki::{CaKind, NodeIdentity, leaf_spec};
        use proto::wire::CertPurpose;
        let etcd = require_tool("etcd", "etcd-server");
        let ca = st.ca(CaKind::Etcd).unwrap();
        let ca_file = st.pki_dir().join(CaKind::Etcd.cert_file());
        let year = Duration::from_secs(365 * 86400);
        let nodes: Vec<_> = cluster.etcd_members().take(members).collect();
        let ports: Vec<(u16, u16)> = nodes.iter().map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> =
            nodes.iter().zip(&ports).map(|(m, (_, p))| format!("{}=https://127.0.0.1:{p}", m.name)).collect();
        let mut guards = Vec::new();
        for (m, (client, peer)) in nodes.iter().zip(&ports) {
            let node = NodeIdentity { name: m.name.clone(), role: m.role, ip: Some(m.ip()) };
            let mdir = dir.join(&m.name);
            std::fs::create_dir_all(&mdir).unwrap();
            for (purpose, stem) in [(CertPurpose::EtcdServer, "server"), (CertPurpose::EtcdPeer, "peer")] {
                let spec = leaf_spec(purpose, cluster, &node).unwrap();
                let (cert, key) = ca.issue_with_new_key(&spec, cluster.pki.key_algorithm, year).unwrap();
                std::fs::write(mdir.join(format!("{stem}.crt")), cert).unwrap();
                std::fs::write(mdir.join(format!("{stem}.key")), key).unwrap();
            }
            let f = |n: &str| mdir.join(n).display().to_string();
            let log = std::fs::File::create(mdir.join("etcd.log")).unwrap();
            let ca_s = ca_file.display().to_string();
            let child = Command::new(&etcd)
                .args(["--name", &m.name, "--data-dir", &f("data"), "--logger=zap", "--log-outputs=stderr"])
                .args(["--listen-client-urls", &format!("https://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("https://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("https://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("https://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "imgbuild-test", "--client-cert-auth", "--peer-client-cert-auth"])
                .args(["--trusted-ca-file", &ca_s, "--cert-file", &f("server.crt"), "--key-file", &f("server.key")])
                .args([
                    "--peer-trusted-ca-file",
                    &ca_s,
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
        // A client certificate as the apiserver holds it.
        let m = nodes[0];
        let node = NodeIdentity { name: m.name.clone(), role: m.role, ip: Some(m.ip()) };
        let spec = leaf_spec(CertPurpose::ApiserverEtcdClient, cluster, &node).unwrap();
        let (cert, key) = ca.issue_with_new_key(&spec, cluster.pki.key_algorithm, year).unwrap();
        std::fs::write(dir.join("client.crt"), cert).unwrap();
        std::fs::write(dir.join("client.key"), key).unwrap();
        let c = EtcdCluster {
            guards,
            endpoints: ports.iter().map(|(c, _)| format!("https://127.0.0.1:{c}")).collect(),
            ca: ca_file,
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            dir: dir.to_path_buf(),
            names: nodes.iter().map(|n| n.name.clone()).collect(),
        };
        wait_for(&format!("{members} healthy etcd members"), Duration::from_secs(60), || {
            let out = c.ctl(true, &["endpoint", "health"]);
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            (text.matches("is healthy").count() == members).then_some(())
        });
        c
    }

    /// etcdctl against every member, with or without the client certificate.
    pub fn ctl(&self, with_cert: bool, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(require_tool("etcdctl", "etcd-client"));
        c.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &self.endpoints.join(","),
            "--cacert",
            self.ca.to_str().unwrap(),
            "--command-timeout=5s",
        ]);
        if with_cert {
            c.args(["--cert", self.client_cert.to_str().unwrap(), "--key", self.client_key.to_str().unwrap()]);
        }
        c.args(args).output().unwrap()
    }

    pub fn logs(&self) -> String {
        self.names
            .iter()
            .map(|n| {
                format!("--- {n}\n{}", std::fs::read_to_string(self.dir.join(n).join("etcd.log")).unwrap_or_default())
            })
            .collect()
    }
}

/// Compares `actual` with the golden file `tests/golden/NAME`; `UPDATE_GOLDEN=1` rewrites it.
pub fn golden(name: &str, actual: &str) {
    let path = workspace_root().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("no golden file {}: run with UPDATE_GOLDEN=1 and review the diff", path.display()));
    if want != actual {
        let diff: Vec<String> = want
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .map(|(i, (a, b))| format!("line {}:\n  golden: {a}\n  actual: {b}", i + 1))
            .collect();
        panic!(
            "{} differs from what is rendered now (UPDATE_GOLDEN=1 to accept):\n{}",
            path.display(),
            diff.join("\n")
        );
    }
}
