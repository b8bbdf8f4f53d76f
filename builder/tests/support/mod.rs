//! Helpers shared by the integration tests: locating real tools, free loopback ports, process
//! guards, and the k8s testbed. A missing tool fails the test with the package to install; CI
//! installs everything with `.ci/setup-host`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Panics with the Debian package to install when `tool` is not on PATH.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not found: apt-get install {package} (or run .ci/setup-host)"))
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

pub fn testbed_dir() -> PathBuf {
    let candidates = [
        std::env::var_os("K8S_TESTBED_DIR").map(PathBuf::from),
        Some(workspace_root().join("../shared/k8s-testbed")),
        Some(PathBuf::from("/work/shared/k8s-testbed")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("up").is_file())
        .unwrap_or_else(|| panic!("k8s testbed not found: set K8S_TESTBED_DIR to ../shared/k8s-testbed"))
}

/// A running k8s testbed control plane on 127.0.0.1 ports of its own; stopped and wiped on drop.
pub struct Testbed {
    /// Holds `run/` (the testbed's run dir) and `pki/`.
    pub base: tempfile::TempDir,
    pub env: HashMap<String, String>,
    dir: PathBuf,
}

impl Testbed {
    /// Starts the testbed. `prepare_pki` may put a `ca.crt` + `ca.key` into the PKI dir first.
    pub fn up(prepare_pki: impl FnOnce(&Path)) -> Testbed {
        let dir = testbed_dir();
        let built = Command::new(dir.join("build")).stderr(Stdio::inherit()).output().expect("run testbed build");
        assert!(built.status.success(), "k8s testbed build failed");
        let base = tempfile::Builder::new().prefix("k8s-testbed-").tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("pki")).unwrap();
        prepare_pki(&base.path().join("pki"));
        let mut cmd = Command::new(dir.join("up"));
        cmd.env("K8S_TESTBED_RUN", base.path().join("run")).env("K8S_TESTBED_PKI", base.path().join("pki"));
        for var in ["ETCD_PORT", "ETCD_PEER_PORT", "API_PORT", "KCM_PORT", "SCHED_PORT"] {
            cmd.env(format!("K8S_TESTBED_{var}"), free_port().to_string());
        }
        let out = cmd.stderr(Stdio::inherit()).output().expect("run testbed up");
        let mut tb = Testbed { base, env: HashMap::new(), dir };
        assert!(out.status.success(), "k8s testbed up failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                tb.env.insert(k.to_string(), v.trim_matches(['\'', '"']).to_string());
            }
        }
        tb
    }

    pub fn pki(&self) -> PathBuf {
        self.base.path().join("pki")
    }

    pub fn api_url(&self) -> &str {
        &self.env["K8S_TESTBED_API_URL"]
    }

    /// Runs the testbed's kubectl with its admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(Path::new(&self.env["K8S_TESTBED_BIN"]).join("kubectl"))
            .env("KUBECONFIG", &self.env["KUBECONFIG"])
            .args(args)
            .output()
            .expect("run kubectl")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(self.dir.join("down"))
            .arg("--wipe")
            .env("K8S_TESTBED_RUN", self.base.path().join("run"))
            .status();
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
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\netcd:x:107:113::/var/lib/etcd:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\netcd:x:113:\n").unwrap();
    root
}

/// The payload a node of `role` gets, pointing at `server`.
pub fn payload(st: &imgbuild::state::State, role: firstboot::Role, server: &str) -> firstboot::bootcfg::BootConfig {
    let now = time::OffsetDateTime::now_utc();
    let tokens = st.tokens().unwrap();
    firstboot::bootcfg::BootConfig {
        version: firstboot::bootcfg::BOOT_CONFIG_VERSION,
        servers: vec![server.to_string()],
        ca_pin: st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin(),
        token: tokens.enrollment_token(role, now).unwrap().token.clone(),
        role,
        network: None,
    }
}

/// Path of a workspace binary, building it first if this test run did not.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(name);
    if !bin.exists() {
        let st =
            Command::new(env!("CARGO")).args(["build", "--bin", name]).current_dir(workspace_root()).status().unwrap();
        assert!(st.success(), "cargo build --bin {name}");
    }
    bin
}
